"""A real MCP client session against the aggregator, with the reference Python SDK.

Usage: mcp_session.py URL TOKEN < calls.json, where calls.json is [[tool, arguments], ...].
Prints one JSON object: the server name, the tool names it lists and every call's outcome.
"""

import asyncio
import json
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client


async def main(url: str, token: str, calls: list) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with streamablehttp_client(url, headers=headers) as (read, write, _):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            tools = await session.list_tools()
            out = {
                "server": init.serverInfo.name,
                "protocol": init.protocolVersion,
                "tools": [t.name for t in tools.tools],
                "calls": [],
            }
            for name, arguments in calls:
                result = await session.call_tool(name, arguments)
                out["calls"].append(
                    {
                        "name": name,
                        "isError": bool(result.isError),
                        "structured": result.structuredContent,
                        "text": [c.text for c in result.content if c.type == "text"],
                    }
                )
            print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.stdin.read())))
