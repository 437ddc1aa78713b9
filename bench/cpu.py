"""CPU used by the processes of a measurement, read from /proc.

The benchmarks run the broker, PostgreSQL and the client on one machine, so a ratio of
throughputs is also a ratio of CPU: what one side spends per message, the others cannot
use. ``Usage`` reads the CPU seconds so far of the RabbitMQ server (the Erlang VM,
``beam.smp``), of every PostgreSQL process (backends, WAL writer, autovacuum) and of this
process; the difference of two readings, per message, is where a measurement's time went.
Where /proc cannot be read (another operating system, another user's server), those parts
read 0 and the detail says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Usage", "seconds_of", "usage"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Usage:
    """CPU seconds so far: the broker, PostgreSQL, this process."""

    broker: float
    postgres: float
    client: float

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.broker - other.broker,
            self.postgres - other.postgres,
            self.client - other.client,
        )

    @property
    def total(self) -> float:
        return self.broker + self.postgres + self.client

    def per(self, messages: int, unit: int = 10_000) -> Usage:
        """Milliseconds per ``unit`` messages."""
        scale = 1000 * unit / messages
        return Usage(self.broker * scale, self.postgres * scale, self.client * scale)

    def describe(self) -> str:
        return (
            f"broker {self.broker:,.0f}, PostgreSQL {self.postgres:,.0f}, "
            f"client {self.client:,.0f} ms"
        )


def seconds_of(pid: int | str) -> float:
    """CPU seconds (user + system) process ``pid`` has used; 0 when it is gone or not ours
    to read."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime, in clock ticks


def _cpu_of(names: tuple[str, ...]) -> float:
    """CPU seconds of every process whose command name starts with one of ``names``."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0.0
    total = 0.0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as comm:
                if not comm.read().startswith(names):
                    continue
        except OSError:  # gone, or not ours to read
            continue
        total += seconds_of(entry)
    return total


def usage() -> Usage:
    """The CPU seconds used so far by the broker, PostgreSQL and this process."""
    times = os.times()
    return Usage(_cpu_of(("beam",)), _cpu_of(("postgres",)), times.user + times.system)
