"""Package boundaries: the maths imports no Flower; the README's Python example runs."""

import re
import subprocess
import sys

from .conftest import ROOT


def test_zeroth_order_engine_and_models_import_no_flower():
    code = (
        "import sys, hosfl_flower.zo, hosfl_flower.models, hosfl_flower.split_server; "
        "bad = [m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')]; assert not bad, bad[:3]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_protocol_server_parts_and_settings_import_no_flower():
    """A protocol's round logic and settings never touch Flower; only its messages speak records."""
    parts = [
        p
        for p in (ROOT / "hosfl_flower" / "protocols").rglob("*.py")
        if p.name in ("server.py", "config.py", "sync.py", "base.py")
    ]
    assert len(parts) >= 12
    for path in parts:
        imports = [line for line in path.read_text().splitlines() if re.match(r"\s*(from|import) flwr", line)]
        assert not imports, (path, imports)


def test_readme_subclass_example_builds():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    strategy_class = namespace["EveryoneEvenRounds"]
    from hosfl_flower import HOSFLClient, HOSFLStrategy, resolve_run_config, server_model_and_test
    from hosfl_flower.protocols import NodeInfo

    config = resolve_run_config({})
    model, test = server_model_and_test(config)
    strategy = strategy_class(model, test, config)
    assert isinstance(strategy, HOSFLStrategy)
    nodes = [NodeInfo(100 + i, i, 10) for i in range(5)]
    assert strategy.sample_nodes(2, nodes) == nodes
    assert len(strategy.sample_nodes(1, nodes)) == 3
    client_class = namespace["FirstExamples"]
    assert issubclass(client_class, HOSFLClient)
    assert namespace["client_app"].client_class is client_class  # the ClientApp builds the user's client on every node


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [
        line for line in re.search(r"```bash\n(.*?)```", readme, re.S).group(1).splitlines() if line and not line.startswith("#")
    ]
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
