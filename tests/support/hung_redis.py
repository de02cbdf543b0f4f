"""A Redis that hangs, and notes what it is asked: for tests of Redis outages."""

from __future__ import annotations

import asyncio
import contextlib


class HungRedis:
    """A Redis that completes the connection handshake and then answers nothing: every
    command it is sent waits out the client's timeout. It notes each command's name.

    Given a real Redis's port (``behind``), it passes everything on to it until
    :meth:`hang`, and again after :meth:`recover`: an outage that loses nothing (a master
    that hangs, a partition). A connection that hung stays hung (its client gave up on it).
    """

    HANDSHAKE = frozenset({"CLIENT", "SELECT", "AUTH", "HELLO"})

    def __init__(self, behind: int | None = None) -> None:
        self.commands: list[str] = []
        self.hanging = behind is None
        self._behind = behind
        self._held: list[asyncio.StreamWriter] = []
        self._pipes: list[asyncio.Task[None]] = []

    def asked(self) -> list[str]:
        """Commands sent by anyone but a probe (a probe only pings)."""
        return [name for name in self.commands if name != "PING"]

    def hang(self) -> None:
        self.hanging = True

    def recover(self) -> None:
        self.hanging = False

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)
        behind: asyncio.StreamWriter | None = None
        hung = False
        try:
            while header := await reader.readline():
                raw, words = [header], []
                for _ in range(int(header[1:])):
                    length = await reader.readline()
                    word = await reader.readexactly(int(length[1:]) + 2)
                    raw += [length, word]
                    words.append(word[:-2])
                name = words[0].decode().upper()
                hung = hung or self.hanging
                if name not in self.HANDSHAKE:
                    self.commands.append(name)
                if not hung:
                    behind = behind or await self._pass_on(writer)
                    behind.write(b"".join(raw))
                elif name == "HELLO":  # RESP3: a map whose "proto" says which was agreed
                    writer.write(b"%1\r\n+proto\r\n:" + words[1] + b"\r\n")
                elif name in self.HANDSHAKE:
                    writer.write(b"+OK\r\n")
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            pass
        finally:
            if behind is not None:
                behind.close()

    async def _pass_on(self, client: asyncio.StreamWriter) -> asyncio.StreamWriter:
        """A connection to the real Redis whose answers go back to ``client``."""
        assert self._behind is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", self._behind)
        self._held.append(writer)

        async def answers() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    client.write(data)

        self._pipes.append(asyncio.create_task(answers()))
        return writer

    def close(self) -> None:
        for pipe in self._pipes:
            pipe.cancel()
        for writer in self._held:
            writer.close()
