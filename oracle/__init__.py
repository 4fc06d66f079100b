"""stepfuzz.oracle: everything that turns a case into a trace.

The case format (`case`), the guest CPU (`guest`, over `isa` and `asm`), the
ideal reference stepper (`reference`, cross-checked by `archstep`), the era
models of KVM (`kvm/`), the comparator (`compare`), the front door that runs
them together (`run`) and the real-KVM runner (`realkvm/`).  Imports nothing
of stepfuzz.fuzz: the oracle is a library the search is built on.
"""
