"""What each kind of model (metrics.json "kind") publishes: one module and one model-card template per kind.

`imagelab/cards/<kind>.py` says which model files its Space runs and its model repo carries, which pip
packages each way of loading it needs, and fills its template `imagelab/cards/<kind>.md` (string.Template:
`$name` fields, so the Markdown's braces and code need no escaping). A fragment `<kind>.<file>.md` is a
card section shown only when the model repo carries that optional file (`$<file>_section`).
"""


def table(rows, header):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def settings(metrics, keys):
    """The training settings a run recorded, as a Markdown table (keys it did not record are left out)."""
    return table([(k, metrics[k]) for k in keys if k in metrics], ["setting", "value"])


def pct(x, digits=1):
    return "n/a" if x is None else f"{x:.{digits}%}"
