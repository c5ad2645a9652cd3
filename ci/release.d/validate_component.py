"""Checks an EC2 Image Builder component document offline: the schema (the structure), then what
a schema cannot say — phase and step names unique, every {{ Name }} a declared parameter (or a
step output), and each ExecuteBash script parsed by `bash -n` with the parameters filled in."""

import json
import re
import subprocess
import sys

import jsonschema
import yaml


def main(doc_path, schema_path):
    with open(doc_path) as f:
        doc = yaml.safe_load(f)
    with open(schema_path) as f:
        schema = json.load(f)
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
    params = {name for p in doc.get("parameters", []) for name in p}
    phases = [p["name"] for p in doc.get("phases", [])]
    if len(set(phases)) != len(phases):
        errors.append(f"a phase given twice: {phases}")
    for phase in doc.get("phases", []):
        steps = [s["name"] for s in phase.get("steps", [])]
        if len(set(steps)) != len(steps):
            errors.append(f"phase {phase['name']}: a step name given twice: {steps}")
        for step in phase.get("steps", []):
            text = json.dumps(step)
            for ref in re.findall(r"{{\s*([^}\s]+)\s*}}", text):
                if ref not in params and not ref.startswith(f"{phase['name']}."):
                    errors.append(f"step {step['name']}: {{{{ {ref} }}}} is not a parameter")
            if step.get("action") == "ExecuteBash":
                for script in step["inputs"]["commands"]:
                    filled = re.sub(r"{{\s*[^}\s]+\s*}}", "x", script)
                    check = subprocess.run(["bash", "-n"], input=filled, text=True, capture_output=True)
                    if check.returncode != 0:
                        errors.append(f"step {step['name']}: bash -n: {check.stderr.strip()}")
    for e in errors:
        print(f"{doc_path}: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
