#!/bin/bash -eu
# Install stepfuzz, then pack every *_fuzzer.py into $OUT with PyInstaller.
# Unicorn, capstone and keystone load native libraries from their packages,
# and atheris has its own: collect them all into the one-file binary.
pip3 install .

for fuzzer in $(find "$SRC/stepfuzz/fuzz" -name '*_fuzzer.py'); do
  compile_python_fuzzer "$fuzzer" \
    --collect-all unicorn --collect-all capstone --collect-all keystone --collect-all atheris
  # The seed corpus: the readable cases shipped in corpus/.
  (cd "$SRC/stepfuzz/corpus" && zip -q -r "$OUT/$(basename -s .py "$fuzzer")_seed_corpus.zip" . -i '*.json')
done
