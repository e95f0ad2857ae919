"""The pure rules of ``trainer.fleet.broker``: agents files parse back to their ids, and no
agent rule of a generated ACL lets an agent write outside its own topics."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.topics import Topics
from trainer.fleet.broker import (
    AGENT_WRITES,
    BrokerSetupError,
    create_passwords,
    read_agent_ids,
    render_acl,
)

agent_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)


@given(st.lists(agent_ids, max_size=8), st.lists(st.sampled_from(["", "# comment", "   "]), max_size=4))
def test_an_agents_file_reads_back_its_ids(ids: list[str], noise: list[str]) -> None:
    lines = [*noise, *(f"  {i}  # note" if n % 2 else i for n, i in enumerate(ids))]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "agents.txt"
        path.write_text("\n".join(lines) + "\n")
        assert read_agent_ids(path) == ids


@given(st.lists(agent_ids.filter(lambda a: a != "trainer"), min_size=1, max_size=6, unique=True))
def test_agents_write_only_their_own_topics(ids: list[str]) -> None:
    topics = Topics()
    user, writes, patterns = None, {}, []
    for line in render_acl(topics, "trainer", ids).splitlines():
        if line.startswith("user "):
            user = line.split()[1]
            writes[user] = []
        elif line.startswith("topic ") and "write" in line.split()[1]:
            writes[user].append(line.split()[2])
        elif line.startswith("pattern "):
            patterns.append(line)
    for agent in ids:
        # Exactly its own report topics: never a wildcard, never its commands.
        own = f"{topics.root}/agents/{agent}"
        assert writes[agent] == [f"{own}/{kind}" for kind in AGENT_WRITES], writes[agent]
    # The only rule for every client: its own marker topics, named by its client id.
    assert patterns == [f"pattern readwrite {topics.root}/probe/%c/#"]


def test_a_bad_agents_file_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "agents.txt"
    path.write_text("edge-1\nedge 2\n")
    with pytest.raises(BrokerSetupError, match=r"agents.txt:2: invalid agent id 'edge 2'"):
        read_agent_ids(path)


def test_a_hanging_mosquitto_passwd_is_one_error_and_leaves_nothing(tmp_path: Path) -> None:
    hangs = tmp_path / "bin" / "mosquitto_passwd"
    hangs.parent.mkdir()
    hangs.write_text("#!/bin/sh\nexec sleep 30\n")
    hangs.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BrokerSetupError, match=r"-U did not finish within 0.5 s"):
        create_passwords(out, ["trainer", "edge-1"], mosquitto_passwd=str(hangs), timeout=0.5)
    assert list(out.iterdir()) == []
