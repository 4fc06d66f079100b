"""Findings: what a campaign keeps and what a person reads.

Owns the crash directory's one format (`crashdir`: the record, the file
names, reading and writing them) and the store that fills it (`store`, one
directory per root cause, given already-confirmed results), the root cause
of a finding old or new (`rootcause`), the shrinker (`minimize`), triage by
root cause (`triage`) and its real-kernel column (`on_kernels`), text
rendering of traces (`report`) and export as C reproducers and selftests
(`export`, with its C in templates/).  Imports stepfuzz.oracle and inputs.
"""
