"""A private Mosquitto for the benchmarks that run agents (bench_agent, bench_fleet)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["Broker"]


class Broker:
    """A private Mosquitto on a free loopback port, publishing ``$SYS`` every second."""

    def __init__(self, work: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        conf = work / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nsys_interval 1\n"
                        + ("user root\n" if os.geteuid() == 0 else ""))
        self.proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"mqtt://127.0.0.1:{self.port}"
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.1).close()
                return
            except OSError:
                time.sleep(0.05)  # polling a port
        raise SystemExit("mosquitto did not start listening within 10 s")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
