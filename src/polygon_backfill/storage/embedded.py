"""An embedded PostgreSQL (pgserver) so the daemon runs without a database server to set up.

The data directory persists between runs; the server listens on a unix socket only.
pgserver counts handles across processes and stops the server when the last one goes.
"""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from polygon_backfill.errors import StorageError

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer


class EmbeddedPostgres:
    """An embedded PostgreSQL (pgserver) kept under a directory, started and stopped by the
    program."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self._server: PostgresServer | None = None
        self._dsn: str | None = None

    def start(self) -> str:
        """Start (or join) the server and return an asyncpg DSN for its unix socket."""
        if self._dsn is not None:
            return self._dsn
        # Imported here: pgserver pulls in platformdirs and psutil, which only this path needs.
        # platformdirs warns when XDG_RUNTIME_DIR is unset (systemd, CI): harmless here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

        try:
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
            dsn = server.get_uri()
        except (OSError, subprocess.SubprocessError, AssertionError, RuntimeError) as exc:
            raise StorageError(
                f"starting the embedded PostgreSQL in {self.data_dir} failed: "
                f"{type(exc).__name__}: {exc} (see {self.data_dir / 'log'})") from exc
        self._server, self._dsn = server, dsn
        return dsn

    def stop(self) -> None:
        """Release our handle; the server stops once no process holds one."""
        server, self._server, self._dsn = self._server, None, None
        if server is not None:
            server.cleanup()

    @property
    def dsn(self) -> str | None:
        """The DSN while started, else None."""
        return self._dsn

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
