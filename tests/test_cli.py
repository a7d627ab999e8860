"""The `ckl` command hub: every command listed, only the chosen one imported."""

import json
import subprocess
import sys

from cli.main import COMMANDS

REPORT_IMPORTS = """
import json
import sys
from cli import main
try:
    main.main(sys.argv[1:])
except SystemExit:
    pass
print("IMPORTED", json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in
      {"torch", "airflow", "mlflow", "kafka", "cli", "pipelines", "serving", "model", "monitoring",
       "compression", "documents", "localservices", "synthetic", "training"})))
"""


def imported_by(*argv: str) -> tuple[str, list[str]]:
    result = subprocess.run([sys.executable, "-c", REPORT_IMPORTS, *argv], capture_output=True, text=True,
                            timeout=120)
    out, marker = result.stdout, "IMPORTED "
    return out[: out.index(marker)], json.loads(out[out.index(marker) + len(marker):])


def test_ckl_help_lists_every_command_without_importing_any():
    help_text, modules = imported_by("--help")
    assert all(name in help_text for name in COMMANDS)
    assert modules == ["cli", "cli.main"]


def test_a_command_imports_its_own_module_only():
    help_text, modules = imported_by("produce", "--help")
    assert "TOPIC" in help_text and "cli.produce" in modules
    assert not {"cli.ingest", "cli.rollback", "cli.serve"} & set(modules)
    assert "torch" not in modules and "airflow" not in modules
