"""The image test runs only when asked for (``make image-test`` sets ``ETA_IMAGE_TEST=1``): it builds the
Docker image, which takes minutes, and needs a Docker daemon. In ``make test`` it is skipped with the reason.

On a failure, the report gets the last lines of every container's log and of the local infrastructure's
logs (one section each), so a red run says what the services said.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path

import pytest

from tests.image.docker_cli import Docker, docker_unavailable_reason

OPT_IN = "ETA_IMAGE_TEST"
DOCKER_KEY = pytest.StashKey[Docker]()
LOG_DIRS_KEY = pytest.StashKey[list[Path]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "image: builds the Docker image and runs the services from it (make image-test)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    opted_in = os.environ.get(OPT_IN) == "1"
    skip = pytest.mark.skip(
        reason=f"image test: run `make image-test` (or set {OPT_IN}=1); it builds the Docker image and "
        "needs a Docker daemon"
    )
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.image)
            if not opted_in:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def docker(request: pytest.FixtureRequest) -> Generator[Docker, None, None]:
    """The Docker CLI for this run. Asked for explicitly, a missing daemon is a failure, not a skip."""
    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.fail(f"image test asked for but Docker is not usable: {reason}", pytrace=False)
    client = Docker()
    request.config.stash[DOCKER_KEY] = client
    try:
        yield client
    finally:
        client.remove_all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and not hasattr(report, "wasxfail"):
        client = item.config.stash.get(DOCKER_KEY, None)
        for container in client.containers if client else []:
            report.sections.append((f"container log: {container.name}", container.logs(tail=120)))
        for log_dir in item.config.stash.get(LOG_DIRS_KEY, []):
            for log in sorted(log_dir.glob("*.log")):
                lines = log.read_text(errors="replace").splitlines()[-40:]
                report.sections.append((f"infrastructure log: {log.name}", "\n".join(lines)))
    return report
