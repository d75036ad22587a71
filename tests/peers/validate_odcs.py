"""Validates ODCS data contracts with Bitol's own model (open-data-contract-standard) and with
`datacontract lint` (datacontract-cli). Usage: validate_odcs.py FILE...; exit 1 naming each file
and what is wrong; a warning from lint counts as a failure (the contract should be clean)."""
import json
import os
import subprocess
import sys
import tempfile

from open_data_contract_standard.model import OpenDataContractStandard

failed = 0
cli = os.path.join(os.path.dirname(sys.executable), "datacontract")
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    try:
        OpenDataContractStandard.model_validate(doc)
    except Exception as e:  # pydantic's ValidationError, named in the message
        print(f"{path}: not a valid ODCS document (open-data-contract-standard): {e}")
        failed += 1
        continue
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "lint.json")
        out = subprocess.run(
            [cli, "lint", path, "--output-format", "json", "--output", report], capture_output=True, text=True
        )
        try:
            with open(report, encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, json.JSONDecodeError):
            result = None
    checks = (result or {}).get("checks", [])
    bad = [c for c in checks if c.get("result") != "passed"]
    if out.returncode != 0 or result is None or result.get("result") != "passed" or bad:
        print(f"{path}: datacontract lint: rc={out.returncode} {out.stdout[-2000:]} {out.stderr[-2000:]}")
        failed += 1
        continue
    print(f"{path}: ok ({len(checks)} lint checks)")
sys.exit(1 if failed else 0)
