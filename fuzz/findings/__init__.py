"""Findings: what a campaign keeps and what a person reads.

Owns the crash directory and its store (`store`), the shrinker
(`minimize`), root-cause triage (`triage`), text rendering of traces
(`report`) and export as C reproducers and selftests (`export`, with its
C in templates/).  Imports stepfuzz.oracle and inputs.
"""
