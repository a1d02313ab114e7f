"""One pytest-xdist worker for the tests of the session's cluster (a pytest plugin).

The session's 2-node Ray cluster and its trained release (the ``cluster_pipeline``
fixture) are session fixtures: with two xdist workers, each worker would start its own
cluster and train its own release. This plugin sends every test that uses one of
``CLUSTER_FIXTURES`` (directly or through another fixture) to one worker, as one work
unit, while the other worker runs the remaining tests one by one.

xdist's own ``--dist loadgroup`` does this for tests marked ``xdist_group``, but it tags
the group onto the test's node id, which pytest 9 no longer lets a plugin change. Here the
workers write the grouped node ids to a file the controller names, and the controller's
scheduler (a ``LoadScopeScheduling`` whose scope of a test is its group) reads it once
every worker has collected.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

CLUSTER_FIXTURES = {"ray_cluster", "cluster_env", "cluster_pipeline"}
GROUP = "cluster"
_KEY = "mar3d_groups_file"
_GROUPS_FILE = pytest.StashKey[Path]()


def _groups_file(config: pytest.Config) -> Path:
    if _GROUPS_FILE not in config.stash:
        config.stash[_GROUPS_FILE] = Path(tempfile.mkdtemp(prefix="mar3d-xdist-")) / "groups.json"
    return config.stash[_GROUPS_FILE]


class GroupScheduling(LoadScopeScheduling):
    """Load scheduling in which the tests of one group are one work unit."""

    def __init__(self, config: pytest.Config, log=None):
        super().__init__(config, log)
        self._grouped: set[str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self._grouped is None:  # called only once every worker has collected
            path = _groups_file(self.config)
            self._grouped = set(json.loads(path.read_text())) if path.is_file() else set()
        return GROUP if nodeid in self._grouped else nodeid


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getoption("dist") == "load":
        return GroupScheduling(config, log)
    return None  # another --dist the user asked for


def pytest_unconfigure(config: pytest.Config) -> None:
    if _GROUPS_FILE in config.stash:
        shutil.rmtree(config.stash[_GROUPS_FILE].parent, ignore_errors=True)


def pytest_configure_node(node) -> None:
    node.workerinput[_KEY] = str(_groups_file(node.config))


@pytest.hookimpl(trylast=True)  # the final selection (-k, -m applied)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput and workerinput.get("workerid") == "gw0" and _KEY in workerinput:
        grouped = [item.nodeid for item in items if CLUSTER_FIXTURES & set(item.fixturenames)]
        Path(workerinput[_KEY]).write_text(json.dumps(grouped))
