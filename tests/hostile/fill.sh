# Fill the scratch disk from the shell: write zeros until the write fails.
# $1 is the file to fill. Prints how many bytes landed and exits with cat's status.
target=${1:?usage: fill.sh FILE}
cat /dev/zero > "$target"
status=$?
echo "written=$(wc -c < "$target") status=$status"
