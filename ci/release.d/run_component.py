"""Runs an EC2 Image Builder component's ExecuteBash steps inside a chroot, phase by phase
(build, validate, test) as Image Builder does, with the parameters filled in:
    run_component.py DOC CHROOT NAME=VALUE...
A step's failure (or a step taking longer than its timeoutSeconds, default 2 h as in AWSTOE)
ends the run with its phase and name."""

import re
import subprocess
import sys

import yaml


def main(doc_path, root, assignments):
    with open(doc_path) as f:
        doc = yaml.safe_load(f)
    values = {p: spec.get("default") for item in doc.get("parameters", []) for p, spec in item.items()}
    values.update(a.split("=", 1) for a in assignments)
    missing = [p for p, v in values.items() if v is None]
    if missing:
        print(f"no value for {missing}", file=sys.stderr)
        return 2
    fill = lambda text: re.sub(r"{{\s*([^}\s]+)\s*}}", lambda m: values[m.group(1)], text)
    for phase in ("build", "validate", "test"):
        for p in (p for p in doc["phases"] if p["name"] == phase):
            for step in p["steps"]:
                for script in step["inputs"]["commands"]:
                    timeout = step.get("timeoutSeconds", 7200)
                    try:
                        run = subprocess.run(["chroot", root, "bash", "-c", fill(script)],
                                             capture_output=True, text=True, timeout=timeout)
                    except subprocess.TimeoutExpired:
                        print(f"{phase}/{step['name']}: over {timeout} s", file=sys.stderr)
                        return 1
                    if run.returncode != 0:
                        print(f"{phase}/{step['name']} exited {run.returncode}:\n{run.stdout}{run.stderr}",
                              file=sys.stderr)
                        return 1
                print(f"{phase}/{step['name']}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
