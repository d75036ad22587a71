"""Validates JSON documents (one per line on stdin) against a JSON Schema (argv[1]) with the
`jsonschema` package. Prints one line per document, `ok` or the first error; exits 1 on any error."""

import json
import sys

from jsonschema import Draft202012Validator

schema = json.load(open(sys.argv[1]))
Draft202012Validator.check_schema(schema)
validator = Draft202012Validator(schema)
bad = 0
for line in sys.stdin:
    if not line.strip():
        continue
    errors = sorted(validator.iter_errors(json.loads(line)), key=lambda e: e.path)
    if errors:
        bad += 1
        print(f"invalid: {errors[0].message} at {list(errors[0].path)}")
    else:
        print("ok")
sys.exit(1 if bad else 0)
