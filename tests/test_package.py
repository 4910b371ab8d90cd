"""Package boundaries: the maths imports no Flower; the README's Python example runs."""

import re
import subprocess
import sys

from .conftest import ROOT


def test_zeroth_order_engine_and_models_import_no_flower():
    code = "import sys, hosfl_flower.zo, hosfl_flower.models, hosfl_flower.reference; " \
           "bad = [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')]; assert not bad, bad[:3]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_readme_subclass_example_builds():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    strategy_class = namespace["EveryoneEvenRounds"]
    from hosfl_flower import HOSFLStrategy, resolve_run_config, server_model_and_test
    from hosfl_flower.strategies import NodeInfo

    config = resolve_run_config({})
    model, test = server_model_and_test(config)
    strategy = strategy_class(model, test, config)
    assert isinstance(strategy, HOSFLStrategy)
    nodes = [NodeInfo(100 + i, i, 10) for i in range(5)]
    assert strategy.sample_nodes(2, nodes) == nodes
    assert len(strategy.sample_nodes(1, nodes)) == 3


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
