"""The README's Python snippets run as written, in order, in one namespace (on this test's 8 CPU devices).

A snippet whose first line is `# needs: ...` names something a test machine does not have (a real
checkpoint) and is only compiled."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_snippets_run():
    with open(os.path.join(ROOT, "README.md")) as f:
        snippets = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(snippets) >= 4
    namespace = {"__name__": "readme"}
    for number, code in enumerate(snippets):
        compiled = compile(code, f"README.md snippet {number}", "exec")
        if not code.startswith("# needs:"):
            exec(compiled, namespace)
    assert namespace["o"].shape == namespace["v"].shape  # the last snippet: the prefill split over 4 devices
