"""Issue 15 item 7: the README's Quick start runs as written. Its shell block is taken from the
README and run by bash in a temp dir, with the binary's path and the ports changed to this
run's (nothing else; the proxy's default ports given as flags), in its own process group,
killed at the end."""
import os
import re

import pytest

from meshlib import REPO, SMESH_BIN, free_port, wait_until


def _quick_start():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "no sh block in the README's Quick start"
    return match.group(1)


@pytest.mark.timeout(60)
def test_the_readme_quick_start_runs_as_written(run, tmp_path):
    script = _quick_start()
    assert "cargo build --release" in script
    script = script.replace("cargo build --release", "true")
    script = script.replace("target/release/smesh", SMESH_BIN)
    ports = {port: free_port() for port in ("8081", "8082", "4140", "4191")}
    for port, ours in ports.items():
        script = script.replace(f"127.0.0.1:{port}", f"127.0.0.1:{ours}")
    # the proxy's own ports are its defaults in the README: named here
    proxy = f"{SMESH_BIN} proxy --config mesh.yaml"
    assert proxy in script, script
    script = script.replace(proxy, f"{proxy} --outbound 127.0.0.1:{ports['4140']} "
                                   f"--admin 127.0.0.1:{ports['4191']}")
    (tmp_path / "quickstart.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMESH_")}
    sh = run.spawn(["bash", "-e", "-o", "pipefail", tmp_path / "quickstart.sh"], "quickstart",
                   cwd=tmp_path, env=env)
    wait_until(lambda: sh.poll() is not None, 45, interval=0.1, what="the Quick start to finish")
    out, err = sh.stdout(), sh.stderr()
    assert sh.poll() == 0, err[-3000:]
    assert re.search(r"^ok: 1 resources in mesh\.yaml$", out, re.M), out
    answers = re.findall(r"^api (v[12]) answered GET /$", out, re.M)
    assert len(answers) == 2, out
    assert "smesh_requests_total{" in out, out
