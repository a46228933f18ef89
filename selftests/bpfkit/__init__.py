"""bpfkit: the standard-library-only toolkit the sk storage selftests are written with.

One module per concern: syscall (bpf(2) and its ABI), btf, asm, maps, prog, cgroup,
sockets, probes; plus the observability modules (sockdiag, kmsg, splats, elements).
"""
