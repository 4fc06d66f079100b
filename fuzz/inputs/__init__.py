"""Inputs: how cases are represented to libFuzzer and how new ones are made.

Owns the total byte encoding of cases (`encoding`), instruction words the
generator draws (`insns`), the generator (`generate`) and the
structure-aware mutator and crossover (`mutate`).  Imports stepfuzz.oracle
only.
"""
