"""A TCP gate between the gateway and the broker: an internet outage on demand.

    python -m bench.gate --listen PORT --to PORT

Forwards 127.0.0.1:listen to 127.0.0.1:to. On stdin, `down` drops every
connection and refuses new ones (the outage), `up` accepts again, `quit`
ends. The broker behind it keeps running, as ThingsBoard does when only the
site's uplink fails, so the subscriber standing in for ThingsBoard is not
disturbed by the outage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys


class Gate:
    def __init__(self, listen: int, to: int) -> None:
        self.listen = listen
        self.to = to
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        if self.server is None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.listen)

    async def down(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.to)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            self.writers.discard(w)
            w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()


async def main_async(args: argparse.Namespace) -> None:
    gate = Gate(args.listen, args.to)
    await gate.up()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        command = line.strip()
        if command == "down":
            await gate.down()
        elif command == "up":
            await gate.up()
        elif command in ("quit", ""):
            await gate.down()
            return
        print(command, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--to", type=int, required=True)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
