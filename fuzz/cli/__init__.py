"""The `stepfuzz` command.

Each command parses its arguments, calls one library function and prints.
`common` declares what several commands share (options, loading cases,
the one-line error); `main` builds the parser; `kvm` holds the commands for
real kernels.  May import every room; nothing imports it.
"""
