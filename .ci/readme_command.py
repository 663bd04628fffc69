"""Print the shell command that follows a marker in README.md (so CI runs exactly what the README says)."""
import pathlib
import re
import sys

marker = sys.argv[1]  # "install-command" or "test-command"
text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
m = re.search(rf"<!-- {re.escape(marker)} -->\s*```bash\n(.+?)\n```", text, re.S)
if not m:
    sys.exit(f"README.md has no ```bash block after <!-- {marker} -->")
print(m.group(1).strip())
