"""`init [PATH]`: write a commented starter manifest that runs as it is.

The steps are plain data rendered with tomli-w (so the TOML is always valid and
quoted right); the comments are put around each rendered table. The result is
parsed back with the real manifest parser before it is written, so a starter that
would not load can never reach the user.
"""

from __future__ import annotations

import re
import shlex
import tomllib

import tomli_w

from task_pipeline.manifest import parse_manifest
from task_pipeline.textsafe import one_line

HEADER = """\
# task-pipeline manifest: shell-script steps, connected by the names of the files they write.
#
# Each step runs its script with INPUT_FILE (its input) and OUTPUT_DIR (an empty directory).
# Every file left in OUTPUT_DIR is stored by content and routed by its name: the part before
# the first "_" (without the extension) names the step that gets it, so "process_1.txt" goes
# to the step "process". A file named "done", or "done_" followed by anything ("done_1.txt",
# "done.json"), is a final result; "donefoo.txt" is not (its route key is "donefoo").
#
#   task-pipeline -manifest {path} -db db -run     process everything, then stop
#   task-pipeline -manifest {path} -db db serve    keep going: schedules, submitted files, edits
#   task-pipeline -db db status          what happened, per step
#   task-pipeline -db db export process  the files "process" got (object paths)
#
# Changing a step's script, shell or env makes a new version of the step; work done by the old
# version is "tainted" and re-runs with -migrate-tainted.

"""

PIPELINE_COMMENT = """\
# Scripts run in this directory (relative to this file).
"""

STEPS = [
    (
        """\
# A start step runs with no input (an empty INPUT_FILE). This one makes three items.
# With `schedule = "15m"` the daemon (serve) would run it again every 15 minutes;
# outputs identical to earlier ones are not processed again.
""",
        {
            "name": "fetch",
            "start": True,
            "script": 'for i in 1 2 3; do\n  echo "item $i" > "$OUTPUT_DIR/process_$i.txt"\ndone\n',
        },
    ),
    (
        """\
# Gets every "process_*" file. The output's name starts with "done", so it is a final result.
# Optional keys (uncomment to use):
#   parallel = 4            # at most 4 tasks of this step at once
#   retries = 2             # attempts after a failure, with a doubling delay...
#   retry_delay = 1.0       # ...starting at this many seconds
#   timeout = 600           # seconds; the script's process group is killed past it
#   inputs = ["process"]    # route keys (or globs on the file name) consumed; default: the step's name
#   env = { LANG = "C" }    # extra environment
#   shell = "bash"          # the interpreter, run as [shell, "-c", script]; default "sh"
""",
        {
            "name": "process",
            "script": 'tr a-z A-Z < "$INPUT_FILE" > "$OUTPUT_DIR/done_$INPUT_NAME"\n',
        },
    ),
]


_MULTILINE = re.compile(r'"""\n(.*?)"""', re.S)


def _literal(m: re.Match) -> str:
    """tomli-w writes scripts as basic strings, with every quote escaped; a literal string reads like the
    shell it is. Only when the text needs no escape at all (checked again by parsing, below)."""
    body = m.group(1).replace('\\"', '"')
    if "\\" in body or "'''" in body:
        return m.group(0)
    return "'''\n" + body + "'''"


def starter_text(path_label: str = "pipeline.toml") -> str:
    data = {"pipeline": {"workdir": "."}, "step": [step for _, step in STEPS]}
    # the path appears in comments: quoted for a shell, and without control characters (TOML forbids them)
    path_label = shlex.quote(one_line(path_label))
    parts = [HEADER.format(path=path_label), PIPELINE_COMMENT,
             tomli_w.dumps({"pipeline": data["pipeline"]}, multiline_strings=True)]
    for comment, step in STEPS:
        parts += ["\n", comment, _MULTILINE.sub(_literal, tomli_w.dumps({"step": [step]}, multiline_strings=True))]
    text = "".join(parts)
    # a starter that does not load, or says something other than `data`, is a bug here, not the user's problem
    if tomllib.loads(text) != data:
        raise RuntimeError("bug: the starter manifest does not round-trip")
    parse_manifest(text, file=path_label)
    return text
