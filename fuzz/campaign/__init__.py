"""Campaigns: running the harness and everything around a running campaign.

Owns the supervisor that starts libFuzzer and its workers (`supervisor`),
campaigns whose target is a real kernel (`realkernel`),
`status` and plots, corpus and crash-directory merges (`merge`), the
rediscovery table (`rediscover`) and the benchmarks (`bench`).  Imports
stepfuzz.oracle, inputs, harness and findings.
"""
