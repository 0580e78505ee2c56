"""The README's promises: its Python example runs as written, its results table is generated."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_python_example_runs_and_the_block_holds(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README lost its Python example"
    code = blocks[0]
    assert 'ToyConfig.preset("tiny")' in code  # the example must stay quick enough to test as written
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    frame = namespace["tracker"].frame()
    final = frame[frame.step == 50]
    assert len(final) == len(namespace["v"].layers)
    # What the example's comment promises: with the gradient block, the drift stays off v_rev.
    assert final.cos.max() < 0.3, final
    assert "step" in capsys.readouterr().out


def test_the_readme_results_table_is_what_the_script_writes():
    proc = subprocess.run([sys.executable, str(ROOT / "analyses" / "readme_results.py"), "--check"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    block = README.split("<!-- results:begin", 1)[1].split("<!-- results:end -->", 1)[0]
    assert "| harmfulness, `grad:v_rev` block |" in block and "bootstrap" in block
