# Who does a command run as? Prints key=value lines (see test_hostile.py).
echo "id_u=$(id -u)"
echo "id_g=$(id -g)"
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status |
    sed 's/:[[:space:]]*/=/'
