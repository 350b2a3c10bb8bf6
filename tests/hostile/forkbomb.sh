# The classic shell fork bomb (POSIX sh, so dash runs it): every call starts
# two more in the background. Only the sandbox's pids limit stops it.
bomb() {
    bomb | bomb &
}
bomb
wait
