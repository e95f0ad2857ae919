"""Bad input to any subcommand of either CLI: exit 2, one line on stderr, no traceback, and
not one file created, changed or removed.

The subcommands come from the argparse parsers themselves: a new subcommand without a case in
``CASES`` fails ``test_every_subcommand_has_bad_input_cases``. Adding a case is one line.
Every case runs the real CLI in a subprocess, in a private copy of a work directory that
holds a trained registry with a TUF repository, data files and agent configs; the whole
directory is hashed before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib.metadata import version
from pathlib import Path

import pytest

import edge_agent.cli
import trainer.cli

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIS = {"edgefleet": "trainer.cli", "edgefleet-agent": "edge_agent.cli"}
PARSERS = {"edgefleet": trainer.cli.build_parser, "edgefleet-agent": edge_agent.cli.build_parser}
NO_BROKER = "mqtt://127.0.0.1:1"  # never reached: every case fails before connecting
PW = {"EDGEFLEET_MQTT_PASSWORD": "s3cret"}

# Subcommands that cannot be given bad input without a live broker (none so far). A command
# listed here must say why in a comment.
NEEDS_LIVE_BROKER: set[tuple[str, ...]] = set()


@dataclass(frozen=True)
class Case:
    """``cli args`` run in the work directory must fail with ``needle`` in its one line."""

    cli: str
    args: str  # shell words, paths relative to the work directory
    needle: str
    env: tuple[tuple[str, str], ...] = ()

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.args)

    def __str__(self) -> str:
        env = " ".join(f"{k}=…" for k, _ in self.env)
        return f"{env + ' ' if env else ''}{self.cli} {self.args}"


def ef(args: str, needle: str, env: dict[str, str] | None = None) -> Case:
    """A case for ``edgefleet``."""
    return Case("edgefleet", args, needle, tuple((env or {}).items()))


def agent(args: str, needle: str) -> Case:
    """A case for ``edgefleet-agent``."""
    return Case("edgefleet-agent", args, needle)


TRAIN = "train --profile x86-64-v3 --name m --epochs 1"
DETECT = "detect m@1 --registry reg --data ok.csv --out scores.csv"
SEARCH = "search --data ok.csv --name s --trials 1 --registry reg"
COMPRESS = "compress m@1 --profile x86-64-v3 --registry reg --data ok.csv"
CASES = [
    # edgefleet train
    ef(f"{TRAIN} --data nope.csv --registry reg", "cannot read nope.csv"),
    ef(f"{TRAIN} --data dup.csv --registry reg", "dup.csv:7: timestamp '2026-01-01 00:20:00' repeats"),
    ef(f"{TRAIN} --data unordered.csv --registry reg", "unordered.csv:6: timestamp '2026-01-01 00:15:00' is earlier"),
    ef(f"{TRAIN} --data ok.csv --registry ok.csv", "ok.csv is not a directory"),
    ef(f"{TRAIN} --data ok.csv --registry corrupt", "not a database"),
    ef(f"{TRAIN} --data ok.csv --registry reg --profile z80", "unknown firmware profile"),
    ef(f"{TRAIN} --data ok.csv --registry reg --epochs 0", "--epochs: must be at least 1"),
    # edgefleet registry
    ef("registry list --registry corrupt", "not a database"),
    ef("registry list", "no registry at .edgefleet"),
    ef("registry show m@9 --registry reg", "known versions: [1]"),
    ef("registry show a/b --registry reg", "bad model name"),
    ef("registry show m --registry corrupt", "not a database"),
    ef("registry migrate --registry corrupt", "not a database"),
    ef("registry migrate --registry nowhere", "no registry at nowhere"),
    # edgefleet profiles
    ef("profiles list --bogus", "unrecognized arguments: --bogus"),
    ef("profiles show z80", "unknown firmware profile"),
    # edgefleet detect
    ef("detect m@9 --registry reg --data ok.csv --out scores.csv", "no version m@9"),
    ef("detect m@1 --registry corrupt --data ok.csv --out scores.csv", "not a database"),
    ef("detect m@1 --registry reg --data nope.csv --out scores.csv", "cannot read nope.csv"),
    ef("detect m@1 --registry reg --data other.csv --out scores.csv", "lacks column(s) ['value']"),
    ef("detect m@1 --registry reg --data ok.csv --out nodir/scores.csv", "nodir does not exist"),
    ef("detect m@1 --registry reg --data ok.csv --out ok.csv", "is the input file"),
    ef("detect m@1 --registry reg --data ok.csv --out somedir", "is a directory"),
    ef(f"{DETECT} --profile z80", "unknown firmware profile"),
    ef(f"{DETECT} --format tflite", "no artifact for format=tflite"),
    # edgefleet evaluate
    ef("evaluate --data ok.csv --labels nope.json", "cannot read labels nope.json"),
    ef("evaluate --data nope.csv --labels labels.json", "no such file or folder: nope.csv"),
    ef("evaluate --data dup.csv --labels labels.json", "dup.csv:7: timestamp '2026-01-01 00:20:00' repeats"),
    ef("evaluate --data ok.csv --labels labels.json --model m@9 --registry reg", "no version m@9"),
    ef("evaluate --data ok.csv --labels labels.json --model m@1 --registry corrupt", "not a database"),
    ef("evaluate --data ok.csv --labels labels.json --plots ok.csv", "is not a folder"),
    ef("evaluate --data ok.csv --labels labels.json --compress bogus:1", "--compress: unknown step 'bogus'"),
    ef("evaluate --data ok.csv --labels labels.json --compress quantize:int8 --model m@1 --registry reg",
       "--compress applies to the models evaluate trains"),
    ef("evaluate --data ok.csv --labels labels.json --compress quantize:int8 --family trees",
       "--compress works on the torch families"),
    ef("evaluate --data ok.csv --labels labels.json --keep-models ok.csv", "--keep-models: "),
    # edgefleet search (everything is checked before a study or a registry file is written)
    ef(f"{SEARCH} --profile z80", "unknown firmware profile"),
    ef(f"{SEARCH} --profile x86-64-v3 --data nope.csv", "cannot read nope.csv"),
    ef(f"{SEARCH} --profile x86-64-v3 --trials 0", "--trials: must be at least 1"),
    ef("search --data ok.csv --profile x86-64-v3 --name s --registry reg", "give --trials N or --timeout"),
    ef(f"{SEARCH} --profile x86-64-v3 --objectives speed", "--objectives must start with quality"),
    ef(f"{SEARCH} --profile x86-64-v3 --sampler annealing", "unknown sampler 'annealing'"),
    ef(f"{SEARCH} --profile x86-64-v3 --labels nope.json", "cannot read labels nope.json"),
    ef(f"{SEARCH} --profile x86-64-v3 --resume", "--resume: no study 's'"),
    ef(f"{SEARCH} --profile x86-64-v3 --space ok.csv", "--space ok.csv: not valid JSON"),
    ef(f"{SEARCH} --profile x86-64-v3 --registry corrupt", "not a database"),
    ef("search --data ok.csv --name s --trials 1", "required: --profile"),
    ef("search show nope --registry reg", "no study 'nope'"),
    ef("search show nope --registry reg --plots ok.csv", "--plots ok.csv exists and is not a folder"),
    ef(f"{SEARCH} --profile x86-64-v3 --plots ok.csv", "--plots ok.csv exists and is not a folder"),
    ef(f"{SEARCH} --profile x86-64-v3 --jobs 0", "--jobs: must be at least 1"),
    ef(f"{SEARCH} --profile x86-64-v3 --data unordered.csv",
       "unordered.csv:6: timestamp '2026-01-01 00:15:00' is earlier"),
    ef(f"{SEARCH} --profile x86-64-v3 --objectives quality,latency --sampler cmaes", "cmaes is single-objective"),
    ef(f"{SEARCH} --profile x86-64-v3 --plots ok.csv/plots", "ok.csv is not a folder"),
    ef("search show nope --registry reg --plots ok.csv/plots", "ok.csv is not a folder"),
    ef("search worker --registry reg --trials 1", "needs --study NAME"),
    ef("search worker --study s --registry reg --data ok.csv", "takes --data from the study"),
    ef("search worker --study s --registry reg --sampler random --seed 3", "takes --sampler, --seed from the study"),
    ef("search worker --study s --registry reg --seed 0", "takes --seed from the study"),
    ef("search worker --study nope --registry reg --trials 1", "no study 'nope'"),
    ef("search worker --study s --storage postgresql://127.0.0.1:1/x --trials 1", "cannot open search storage"),
    ef("search worker --study s --storage bogus://x --trials 1", "cannot open search storage"),
    ef("search walk --registry reg", "unexpected 'walk'"),
    # edgefleet compress
    ef(f"{COMPRESS} --recipe prune:2", "prune: the ratio must be in (0, 1), got 2"),
    ef(f"{COMPRESS} --recipe shrink:0.5", "unknown step 'shrink' in recipe"),
    ef(f"{COMPRESS} --recipe quantize:int8,finetune:1", "quantize must be the last step"),
    ef(f"{COMPRESS} --recipe sparsify:0.5,distill:8", "a new student replaces the masked model"),
    ef(f"{COMPRESS} --recipe lowrank:rank=100000", "gets smaller at that rank"),
    ef("compress m@9 --recipe finetune:1 --profile x86-64-v3 --registry reg --data ok.csv", "no version m@9"),
    ef("fl start --model m --group g --rounds 1 --registry reg", "name the version to start from: m@N"),
    ef("fl start --model m@9 --group g --rounds 1 --registry reg", "no version m@9"),
    ef("fl start --model m@1 --group g --rounds 1 --dp off --epsilon-budget 2 --registry reg",
       "--epsilon-budget needs differential privacy"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --data nope.csv", "cannot read nope.csv"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --mu 0.1", "--mu is FedProx's proximal weight: it needs --strategy fedprox"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --superlink nowhere", "--superlink must be HOST:PORT"),
    ef("fl start --model m@1 --group g --rounds 0 --registry reg", "--rounds: must be at least 1"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --tls-cert notpem.txt --tls-key pw.txt", "give --tls-ca with --tls-cert and --tls-key"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --tls-cert notpem.txt --tls-ca notpem.txt", "give --tls-cert, --tls-key and --tls-ca together"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --tls-ca notpem.txt", "give --tls-cert, --tls-key and --tls-ca together"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --tls-cert nope.pem --tls-key nope.key --tls-ca nope.pem", "cannot read --tls-ca nope.pem"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --tls-cert pw.txt --tls-key pw.txt --tls-ca notpem.txt", "--tls-ca notpem.txt holds no PEM certificate"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --superlink 127.0.0.1:9 --tls-cert pw.txt --tls-key pw.txt --tls-ca notpem.txt",
       "--tls-cert and --tls-key are for the SuperLink fl start starts"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --superlink 127.0.0.1:9 --host 10.0.0.1", "--host is for the SuperLink fl start starts"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --host 0.0.0.0", "--host 0.0.0.0 listens everywhere: give --advertise HOST:PORT"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --advertise nowhere", "--advertise must be HOST:PORT, got 'nowhere'"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --run 'a b'", "run must be 1-64 letters"),
    ef("fl start --model m@1 --group g/h --rounds 1 --registry reg", "group must be 1-64 letters"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --epsilon-budget 0.5",
       "more than --epsilon-budget 0.5"),
    ef("fl start --model m@1 --group g --rounds 1 --registry reg --strategy fedadam",
       "fedadam cannot run with --dp central"),
    ef("fl start --group g --rounds 1 --registry reg", "one of the arguments --model --spec is required"),
    ef("fl start --model m@1 --spec spec2.json --group g --rounds 1 --registry reg", "not allowed with argument"),
    ef("fl start --spec nope.json --name n --group g --rounds 1 --registry reg --data ok.csv", "cannot read --spec nope.json"),
    ef("fl start --spec ok.csv --name n --group g --rounds 1 --registry reg --data ok.csv", "--spec ok.csv: not valid JSON"),
    ef("fl start --spec spec-bad.json --name n --group g --rounds 1 --registry reg --data ok.csv", "unknown model family 'nope'"),
    ef("fl start --spec spec-trees.json --name n --group g --rounds 1 --registry reg --data ok.csv", "federated averaging needs a torch family"),
    ef("fl start --spec spec2.json --group g --rounds 1 --registry reg --data ok.csv", "give --name NAME"),
    ef("fl start --spec spec2.json --name n --group g --rounds 1 --registry reg", "give --data CSV with --spec"),
    ef("fl start --spec spec2.json --name 'a b' --group g --rounds 1 --registry reg --data ok.csv", "bad model name 'a b'"),
    ef("fl start --spec spec2.json --name n --group g --rounds 1 --registry reg --data ok.csv --profile x86-64-v3", "ok.csv: 1 column(s), the spec reads 2"),
    ef("fl start --model m@1 --name n --group g --rounds 1 --registry reg", "--name names the result of a run from --spec"),
    ef("fl status fl-nope --registry reg", "no federated run 'fl-nope'"),
    ef("fl status --registry nope", "no registry at nope"),
    ef("compress m@1 --recipe finetune:1 --registry reg --data ok.csv", "give at least one --profile"),
    ef("compress m@1 --recipe finetune:1 --profile x86-64-v3 --registry reg --data nope.csv", "cannot read nope.csv"),
    ef("compress m@1 --recipe finetune:1 --profile x86-64-v3 --registry reg --data dup.csv",
       "dup.csv:7: timestamp '2026-01-01 00:20:00' repeats"),
    ef(f"{COMPRESS} --recipe finetune:1 --max-quality-drop -1", "--max-quality-drop: must be a number >= 0"),
    ef("compress m@1 --recipe finetune:1 --profile x86-64-v3 --registry corrupt --data ok.csv", "corrupt"),
    # edgefleet demo (checks its broker URL before it starts anything)
    ef("demo --broker http://127.0.0.1:1883", "bad broker URL"),
    # edgefleet data synth
    ef("data synth --out h.csv --rows 100", "--rows must be at least 200, got 100"),
    ef("data synth --out h.csv --anomalies -3", "--anomalies: must be at least 0, got -3"),
    ef("data synth --out nodir/h.csv", "nodir does not exist"),
    ef("data synth --out somedir", "somedir is a directory"),
    ef("data synth --out h.csv --labels h.csv", "would overwrite the CSV"),
    # edgefleet repo
    ef("repo init --registry reg", "already exists"),
    ef("repo init --registry ok.csv", "cannot create a TUF repository"),
    ef("repo publish --registry reg --broker http://127.0.0.1:1", "bad broker URL"),
    ef(f"repo publish --registry bare --broker {NO_BROKER}", "edgefleet repo init --registry bare"),
    ef(f"repo publish --registry reg --broker {NO_BROKER}", "--username", PW),
    ef("repo publish --registry reg --broker mqtts://127.0.0.1:1 --ca-file nope.pem", "--ca-file: cannot read nope.pem"),
    ef("repo refresh --registry bare", "edgefleet repo init --registry bare"),
    ef(f"repo refresh --registry reg --broker {NO_BROKER}", "--username", PW),  # nothing re-signed
    ef(f"repo refresh --registry reg --broker {NO_BROKER} --password-file nope", "cannot read --password-file"),
    ef("repo refresh --registry reg --broker mqtt://127.0.0.1:1 --ca-file notpem.txt", "needs an mqtts:// broker URL"),
    ef("repo prune --registry bare", "edgefleet repo init --registry bare"),
    ef("repo prune --registry reg --keep -1", "--keep: must be 0 or more"),
    ef(f"repo prune --registry reg --broker {NO_BROKER}", "--username", PW),  # nothing pruned
    ef("repo prune --registry reg --broker mqtts://127.0.0.1:1 --cert-file nope.pem", "--cert-file: cannot read nope.pem"),
    ef("repo rotate-root --registry bare", "edgefleet repo init --registry bare"),
    ef("repo rotate-root --registry reg --root-key-dir nowhere", "no root key at nowhere/root.pem"),
    ef("repo rotate-root --registry reg --new-keys bogus", "expected 'all' or some of"),
    ef("repo rotate-root --registry reg --expires 0", "--expires: must be at least 1"),
    ef(f"repo rotate-root --registry reg --broker {NO_BROKER}", "--username", PW),  # nothing signed
    # edgefleet deploy
    ef(f"deploy m@9 --group g --registry reg --broker {NO_BROKER}", "no version m@9"),
    ef(f"deploy zz --group g --registry reg --broker {NO_BROKER}", "no model 'zz'"),
    ef(f"deploy m@1 --group a/b --registry reg --broker {NO_BROKER}", "group"),
    ef(f"deploy m@1 --group g --registry bare --broker {NO_BROKER}", "edgefleet repo init --registry bare"),
    ef(f"deploy m@1 --group g --registry corrupt --broker {NO_BROKER}", "not a database"),
    ef("deploy m@1 --group g --registry reg --broker mqtt://u:p@127.0.0.1:1", "credentials in the settings"),
    ef(f"deploy m@1 --group g --registry held --broker {NO_BROKER}",
       "rollout ro-0000abcd of m@1 holds group g: let it finish, or `edgefleet rollout abort ro-0000abcd`"),
    ef(f"deploy m@1 --agent a1 --registry held --broker {NO_BROKER}", "holds agent a1 (group g)"),
    ef(f"deploy m@1 --agent a2 --registry held --broker {NO_BROKER}", "holds agent a2 (group g)"),
    ef(f"deploy m@1 --group g --registry reg --broker {NO_BROKER} --password-file pw.txt", "--password-file is given but --username is not"),
    ef(f"deploy m@1 --group g --registry reg --broker {NO_BROKER} --chunk-size 0", "--chunk-size: must be at least 1"),
    ef(f"deploy m@1 --group g --registry reg --broker {NO_BROKER} --shadow", "group g has no model in slot 'default' to shadow"),
    ef(f"deploy --clear-shadow --group g --registry reg --broker {NO_BROKER}", "group g has no shadow in slot 'default' to clear"),
    ef(f"deploy m@1 --clear-shadow --group g --registry reg --broker {NO_BROKER}", "--clear-shadow takes no MODEL@VERSION"),
    ef(f"deploy --group g --registry reg --broker {NO_BROKER}", "give MODEL@VERSION to deploy"),
    ef(f"deploy m@1 --shadow --clear-shadow --group g --registry reg --broker {NO_BROKER}", "not allowed with argument"),
    ef("deploy m@1 --group g --registry reg --broker mqtts://127.0.0.1:1 --ca-file notpem.txt", "notpem.txt is not a PEM file"),
    # edgefleet fleet status
    ef("fleet status --broker tcp://127.0.0.1:1", "bad broker URL"),
    ef(f"fleet status --broker {NO_BROKER}", "EDGEFLEET_MQTT_PASSWORD is set but --username is not", PW),
    ef(f"fleet status --broker {NO_BROKER} --timeout 0", "--timeout: must be a positive number"),
    ef(f"fleet status --broker {NO_BROKER} --broker-timeout -1", "--broker-timeout: must be a positive number"),
    ef("fleet status --broker mqtts://127.0.0.1:1 --key-file notpem.txt", "needs its certificate"),
    ef("fleet status --broker mqtts://127.0.0.1:1 --cert-file notpem.txt", "--cert-file: notpem.txt is not a PEM file"),
    # edgefleet broker
    ef("broker acl --out acl.txt --agent a/b", "agent id: invalid agent id 'a/b'"),
    ef("broker acl --out acl.txt", "no agent given: use --agent ID or --agents-file FILE, or --any-agent"),
    ef("broker acl --out acl.txt --agent trainer", "agent id 'trainer' is the trainer's user name"),
    ef("broker acl --out acl.txt --agent a1 --agent a1", "agent id 'a1' is listed twice"),
    ef("broker acl --out acl.txt --any-agent --agent a1", "--any-agent does not take --agent"),
    ef("broker acl --out acl.txt --agents-file other.csv", "--agents-file: other.csv:1: invalid agent id"),
    ef("broker acl --out acl.txt --agents-file nope.txt", "--agents-file: cannot read nope.txt"),
    ef("broker acl --out acl.txt --agent a1 --topic-root a/+", "--topic-root: invalid topic root"),
    ef("broker acl --out acl.txt --agent a1 --trainer-user 'tr ainer'", "trainer user: invalid agent id"),
    ef("broker acl --out nodir/acl.txt --agent a1", "--out: no such directory nodir"),
    ef("broker acl --out somedir --agent a1", "--out: cannot write somedir"),
    ef("broker passwd --out-dir somedir --agent a/b", "invalid agent id 'a/b'"),
    ef("broker passwd --out-dir somedir --agent trainer", "agent id 'trainer' is the trainer's user name"),
    ef("broker passwd --out-dir somedir", "no agent given: use --agent ID or --agents-file FILE"),
    ef("broker passwd --out-dir pw.txt --agent a1", "--out-dir: pw.txt is not a directory"),
    ef("broker passwd --out-dir somedir --agent a1 --mosquitto-passwd nowhere/mosquitto_passwd",
       "nowhere/mosquitto_passwd not found"),
    ef("broker passwd --out-dir somedir --agent a1 --mosquitto-passwd notpem.txt",
       "notpem.txt is not an executable program"),
    ef("broker passwd --out-dir somedir --agent a1 --mosquitto-passwd /bin/false", "/bin/false -U failed"),
    ef("broker acl --out acl.txt --agent a1 --topic-root 'plant%u/v1'", "'%' would be a substitution"),
    # edgefleet rollout (everything is checked before the broker is reached)
    ef(f"rollout start m@9 --group g --registry reg --broker {NO_BROKER}", "no version m@9"),
    ef(f"rollout start m --group g --registry reg --broker {NO_BROKER}", "name the version to roll out: m@N"),
    ef(f"rollout start m@1 --group g --registry reg --broker {NO_BROKER}", "unknown group 'g'"),
    ef(f"rollout start m@1 --group a/b --registry reg --broker {NO_BROKER}", "invalid group name"),
    ef(f"rollout start m@1 --group g --registry reg --broker {NO_BROKER} --stages 0,100%", "bad stage '0'"),
    ef(f"rollout start m@1 --group g --registry reg --broker {NO_BROKER} --stages 50%,10%,100%", "--stages must grow"),
    ef(f"rollout start m@1 --group g --registry reg --broker {NO_BROKER} --stages 1,50%", "must end with 100%"),
    ef(f"rollout start m@1 --group g --registry reg --broker {NO_BROKER} --soak 0", "bad duration '0'"),
    ef(f"rollout start m@1 --group g --registry reg --broker {NO_BROKER} --gates anomaly-rate=lots",
       "anomaly-rate=lots: expected a factor"),
    ef(f"rollout start m@1 --group g --registry reg --broker {NO_BROKER} --gates speed=on", "unknown gate 'speed'"),
    ef(f"rollout start m@1 --group g --registry bare --broker {NO_BROKER}", "edgefleet repo init --registry bare"),
    ef("rollout status nope --registry reg", "bad rollout id 'nope'"),
    ef("rollout status ro-00000000 --registry reg", "no rollout 'ro-00000000'"),
    ef("rollout pause ro-00000000 --registry reg", "no rollout 'ro-00000000'"),
    ef(f"rollout resume ro-00000000 --registry reg --broker {NO_BROKER}", "no rollout 'ro-00000000'"),
    ef(f"rollout abort ro-00000000 --registry reg --broker {NO_BROKER}", "no rollout 'ro-00000000'"),
    ef(f"rollout abort ro-0000dead --registry held --broker {NO_BROKER}",
       "rollout ro-0000dead is rolled_back: nothing to abort"),
    ef(f"rollout resume ro-0000dead --registry held --broker {NO_BROKER} --json",
       "rollout ro-0000dead is rolled_back: nothing to resume"),
    ef("rollout pause ro-0000dead --registry held", "rollout ro-0000dead is rolled_back: nothing to pause"),
    # edgefleet-agent
    agent("init-config --agent-id a/b --group g --profile x86-64-v3 --broker mqtt://h:1 --trust t --state-dir s --source host", "invalid agent id 'a/b'"),
    agent("init-config --agent-id a --group g --profile x86-64-v3 --broker http://h --trust t --state-dir s --source host", "bad broker URL"),
    agent("check-config --config nope.toml", "cannot read config nope.toml"),
    agent("check-config --config not-toml.toml", "not valid TOML"),
    agent("check-config --config ca-typo.toml", "broker.ca_file: cannot read"),
    agent("check-config --config ca-notpem.toml", "broker.ca_file:"),
    agent("check-config --config tls-plain.toml", "broker.url is mqtt:// (no TLS)"),
    agent("check-config --config both-passwords.toml", "password_file and broker.password_env are both set"),
    agent("check-config --config no-username.toml", "broker.username is not"),
    agent("run --config ca-typo.toml", "broker.ca_file: cannot read"),
    agent("run --config both-passwords.toml", "both set"),
    agent("run --config nope.toml --exit-at-end", "cannot read config"),
    agent("check-config --config fl-backslash.toml", "federated.state_dir may not contain a double quote, a backslash"),
    agent("run --config fl-backslash.toml --exit-at-end", "federated.state_dir may not contain"),
    agent("run --config fl-file.toml --exit-at-end", "federated.state_dir"),
    agent("check-config --config drift-window.toml", "drift.window must be between 100 and 100000 samples"),
    agent("check-config --config drift-window-huge.toml", "drift.window must be between 100 and 100000 samples"),
    agent("run --config drift-clear.toml --exit-at-end", "drift.psi_clear must be positive and at most drift.psi_threshold"),
    agent("simulate --count 0 --config plain.toml", "--count: must be a positive integer"),
    agent("simulate --count many --config plain.toml", "--count: must be a positive integer"),
    agent("simulate --count 3 --config nope.toml", "cannot read config nope.toml"),
    agent("simulate --count 3 --config both-passwords.toml", "both set"),
    agent("simulate --count 3 --config plain.toml --prefix a/b", "--prefix 'a/b'"),
    agent("simulate --count 3 --config plain.toml --concurrency 0", "--concurrency: must be a positive integer"),
    agent("simulate --count 3 --config stdin.toml", "stdin cannot feed many simulated agents"),
    agent("simulate --count 3 --config api-local.toml", "[api] enabled is not supported by simulate"),
    agent("simulate --count 99999 --config plain.toml", "--count must be between 1 and"),
    agent("check-config --config api-public.toml", "api.listen must be HOST:PORT on a loopback address"),
    agent("run --config api-public.toml --exit-at-end", "api.listen must be HOST:PORT on a loopback"),
]


# -- the work directory -----------------------------------------------------------------------


def _config(**broker: str) -> str:
    lines = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in broker.items())
    return (
        '[agent]\nid = "a1"\ngroup = "g"\nprofile = "x86-64-v3"\nstate_dir = "state"\n'
        f"[broker]\n{lines}\n"
        '[trust]\nroot = "reg/tuf/metadata/root.json"\n[source]\nspec = "csv:ok.csv"\n'
    )


def _series(minutes: list[int]) -> str:
    t0 = datetime(2026, 1, 1)
    return "timestamp,value\n" + "".join(
        f"{t0 + timedelta(minutes=m):%Y-%m-%d %H:%M:%S},{math.sin(m / 50):.4f}\n" for m in minutes
    )


def _cli(workdir: Path, cli: str, argv: list[str], env: dict[str, str] | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("EDGEFLEET_REGISTRY", "EDGEFLEET_MQTT_PASSWORD")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", CLIS[cli], *argv], cwd=workdir, capture_output=True, text=True,
        timeout=timeout, env={**base, **(env or {})},
    )


HELD_ROLLOUT = "ro-0000abcd"


def _hold_group(held: Path, reg: Path) -> None:
    """``held``: ``reg`` with a running rollout of m@1 on group g (a1 taking part, a2 skipped)."""
    from trainer.fleet.rollout import DEFAULT_GATES, RolloutRecord, RolloutStore
    from trainer.registry import Registry

    shutil.copytree(reg, held)
    now = "2026-01-01T00:00:00.000+00:00"
    with Registry.open(held) as registry:
        RolloutStore(registry).create(RolloutRecord(
            id=HELD_ROLLOUT, created_at=now, updated_at=now, model="m", version=1,
            previous_version=1, group="g", slot="default", stages=("1", "100%"), soak_s=60.0,
            gates=DEFAULT_GATES, agents=("a1",), state="running", stage=0, paused=True,
            abort_requested=False, progress={"phase": "deploy", "skipped": {"a2": "offline"}},
        ))
        RolloutStore(registry).create(RolloutRecord(
            id="ro-0000dead", created_at=now, updated_at=now, model="m", version=1,
            previous_version=1, group="h", slot="default", stages=("1", "100%"), soak_s=60.0,
            gates=DEFAULT_GATES, agents=("h1",), state="rolled_back", stage=0, paused=False,
            abort_requested=False, progress={"phase": "done"}, finished_at=now,
        ))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work directory: ``reg`` (m@1 + TUF repository), ``bare`` (no TUF), data, configs."""
    w = tmp_path_factory.mktemp("work")
    minutes = list(range(0, 5 * 300, 5))  # long enough to train on: only the order is wrong
    (w / "ok.csv").write_text(_series(minutes))
    (w / "dup.csv").write_text(_series([*minutes[:5], 20, *minutes[5:]]))
    (w / "unordered.csv").write_text(_series([*minutes[:3], 20, 15, *minutes[5:]]))
    (w / "other.csv").write_text("timestamp,cpu\n2026-01-01 00:00:00,1\n")
    window = ["2026-01-01 12:00:00.000000", "2026-01-01 13:00:00.000000"]
    (w / "labels.json").write_text(json.dumps({"ok.csv": [window], "dup.csv": [window]}))
    (w / "somedir").mkdir()
    (w / "corrupt").mkdir()
    (w / "corrupt" / "registry.sqlite").write_bytes(b"this is not an SQLite database\n" * 64)
    (w / "notpem.txt").write_text("not a certificate\n")
    (w / "pw.txt").write_text("s3cret\n")
    specs = {"spec2": {"family": "linear", "window": 16, "features": 2, "hidden": []},
             "spec-bad": {"family": "nope", "window": 16, "features": 1, "hidden": []},
             "spec-trees": {"family": "trees", "window": 16, "features": 1, "hidden": []}}
    for name, spec in specs.items():
        (w / f"{name}.json").write_text(json.dumps(spec))
    for argv in (
        [*shlex.split(TRAIN), "--data", "ok.csv", "--registry", "reg", "-q"],
        ["repo", "init", "--registry", "reg"],
    ):
        proc = _cli(w, "edgefleet", argv, timeout=600)
        assert proc.returncode == 0, proc.stderr
    shutil.copytree(w / "reg", w / "bare", ignore=shutil.ignore_patterns("tuf"))
    _hold_group(w / "held", w / "reg")
    (w / "not-toml.toml").write_text("[agent\n")
    configs = {
        "ca-typo": {"url": "mqtts://127.0.0.1:8883", "ca_file": "ca.pme"},
        "ca-notpem": {"url": "mqtts://127.0.0.1:8883", "ca_file": "notpem.txt"},
        "tls-plain": {"url": "mqtt://127.0.0.1:1883", "ca_file": "notpem.txt"},
        "both-passwords": {"url": "mqtt://127.0.0.1:1883", "username": "u",
                           "password_file": "pw.txt", "password_env": "EDGEFLEET_MQTT_PASSWORD"},
        "no-username": {"url": "mqtt://127.0.0.1:1883", "password_file": "pw.txt"},
    }
    for name, broker in configs.items():
        (w / f"{name}.toml").write_text(_config(**broker))
    (w / "plain.toml").write_text(_config(url=NO_BROKER))
    (w / "stdin.toml").write_text(_config(url=NO_BROKER).replace('spec = "csv:ok.csv"', 'spec = "stdin"'))
    federated = {"fl-backslash": "fl\\\\x", "fl-file": "pw.txt"}  # pw.txt: a file, not a directory
    for name, state_dir in federated.items():
        (w / f"{name}.toml").write_text(_config(url="mqtt://127.0.0.1:1883") +
                                        f'[federated]\nenabled = true\nstate_dir = "{state_dir}"\n')
    drift = {"drift-window": "window = 10", "drift-window-huge": "window = 10000000", "drift-clear": "psi_threshold = 0.2\npsi_clear = 0.3"}
    for name, lines in drift.items():
        (w / f"{name}.toml").write_text(_config(url="mqtt://127.0.0.1:1883") + f"[drift]\n{lines}\n")
    (w / "api-local.toml").write_text(_config(url=NO_BROKER) + '[api]\nenabled = true\n')
    (w / "api-public.toml").write_text(_config(url="mqtt://127.0.0.1:1883") +
                                       '[api]\nenabled = true\nlisten = "0.0.0.0:9464"\n')
    return w


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content hash (directories too: a new empty one counts)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


# -- the tests --------------------------------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every leaf subcommand of ``parser``, as the words that select it."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {prefix}
    found: set[tuple[str, ...]] = set()
    for name, child in subs[0].choices.items():
        found |= subcommands(child, (*prefix, name))
    return found


def command_of(case: Case) -> tuple[str, ...]:
    """The subcommand words a case's arguments select."""
    parser, words = PARSERS[case.cli](), []
    for arg in case.argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or arg not in subs[0].choices:
            break
        words.append(arg)
        parser = subs[0].choices[arg]
    return tuple(words)


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_every_subcommand_has_bad_input_cases(cli: str) -> None:
    leaves = subcommands(PARSERS[cli]())
    covered = {command_of(c) for c in CASES if c.cli == cli}
    assert covered <= leaves, f"cases name no subcommand: {covered - leaves}"
    missing = leaves - covered - NEEDS_LIVE_BROKER
    assert not missing, f"add a bad-input Case to CASES for: {sorted(' '.join(m) for m in missing)}"


@pytest.mark.slow  # one subprocess per case; the module trains one small model once
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: Case, template: Path, tmp_path: Path) -> None:
    work = Path(shutil.copytree(template, tmp_path / "work"))
    before = tree(work)
    try:
        proc = _cli(work, case.cli, case.argv, dict(case.env), timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{case}` did not exit within 120 s (retrying instead of refusing?)")
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert case.needle in lines[0], lines[0]
    assert proc.returncode == 2, (proc.returncode, lines[0])
    assert proc.stdout == ""
    assert tree(work) == before


def test_both_clis_print_the_package_version(tmp_path: Path) -> None:
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version("edgefleet") == declared  # the metadata --version reads is this checkout's
    for cli in CLIS:
        proc = _cli(tmp_path, cli, ["--version"])
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"edgefleet {declared}\n", "")
