"""The floor: the smallest useful server on the same `mcp` SDK as flux-mcp, with one trivial tool.

`python bench/floor_server.py` serves stdio; `python bench/floor_server.py --port N` serves
streamable HTTP on 127.0.0.1:N at /mcp. Nothing else is imported, so its start-up time is the
SDK's own and its round trip is the protocol's own. `wait` (sleeps, then answers) is the floor of
the concurrency figure: what the SDK alone costs for many calls that each wait on a job.
"""

from __future__ import annotations

import sys

import anyio
from mcp.server.mcpserver import MCPServer

server = MCPServer("floor", log_level="WARNING")


@server.tool()
def ping() -> str:
    """Answers pong (the floor of a call)."""
    return "pong"


@server.tool()
async def wait(seconds: float) -> str:
    """Answers after `seconds` (the floor of a call that waits on a job)."""
    await anyio.sleep(seconds)
    return "done"


if __name__ == "__main__":
    if "--port" in sys.argv:
        port = int(sys.argv[sys.argv.index("--port") + 1])
        server.run("streamable-http", host="127.0.0.1", port=port)
    else:
        server.run("stdio")
