"""A fixture server for the official MCP conformance suite (server scenarios), written for
Airlock's tests with the Python SDK from the scenarios' own descriptions
(`conformance list`, the package's scenario texts) — not copied from the suite's repository.

  conformance_server.py --port P --cert C --key K [--hostname H]

Scenarios this fixture does not satisfy fail when run directly too; they are listed in
tests/conformance-baseline.yml, and the test requires every other one to pass through Airlock.
"""

import argparse
import asyncio
import base64
import json

# 1x1 red PNG and a minimal WAV (44-byte header, no samples).
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
        "0000000c4944415408d763f8cfc000000301010018dd8db00000000049454e44ae426082"
    )
).decode()
WAV = base64.b64encode(
    b"RIFF" + (36).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
    + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (8000).to_bytes(4, "little")
    + (8000).to_bytes(4, "little") + (1).to_bytes(2, "little") + (8).to_bytes(2, "little")
    + b"data" + (0).to_bytes(4, "little")
).decode()


def event_store():
    """An in-memory event store: makes the server resumable (priming events, retry, replay
    after Last-Event-ID)."""
    from mcp.server.streamable_http import EventMessage, EventStore

    class InMemoryEventStore(EventStore):
        def __init__(self):
            self.events = []  # (event_id, stream_id, message)
            self.counter = 0

        async def store_event(self, stream_id, message):
            self.counter += 1
            event_id = f"{stream_id}_{self.counter}"
            self.events.append((event_id, stream_id, message))
            return event_id

        async def replay_events_after(self, last_event_id, send_callback):
            index = next((i for i, e in enumerate(self.events) if e[0] == last_event_id), None)
            if index is None:
                return None
            stream_id = self.events[index][1]
            for event_id, sid, message in self.events[index + 1 :]:
                if sid == stream_id and message is not None:
                    await send_callback(EventMessage(message, event_id))
            return stream_id

    return InMemoryEventStore()


def build(hostname, port):
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.prompts.base import UserMessage
    from mcp_types import (
        AudioContent,
        BlobResourceContents,
        CallToolResult,
        Completion,
        EmbeddedResource,
        ImageContent,
        SamplingMessage,
        TextContent,
        TextResourceContents,
    )

    mcp = MCPServer("airlock-conformance-fixture")

    @mcp.tool(description="Returns simple text")
    def test_simple_text() -> list:
        return [TextContent(type="text", text="This is a simple text response for testing.")]

    @mcp.tool(description="Returns an image")
    def test_image_content() -> list:
        return [ImageContent(type="image", data=PNG, mimeType="image/png")]

    @mcp.tool(description="Returns audio")
    def test_audio_content() -> list:
        return [AudioContent(type="audio", data=WAV, mimeType="audio/wav")]

    @mcp.tool(description="Returns an embedded resource")
    def test_embedded_resource() -> list:
        return [
            EmbeddedResource(
                type="resource",
                resource=TextResourceContents(
                    uri="test://embedded-resource",
                    mimeType="text/plain",
                    text="This is an embedded resource content.",
                ),
            )
        ]

    @mcp.tool(description="Returns several content types")
    def test_multiple_content_types() -> list:
        return [
            TextContent(type="text", text="Multiple content types test:"),
            ImageContent(type="image", data=PNG, mimeType="image/png"),
            EmbeddedResource(
                type="resource",
                resource=TextResourceContents(
                    uri="test://mixed-content-resource",
                    mimeType="application/json",
                    text=json.dumps({"test": "data", "value": 123}),
                ),
            ),
        ]

    @mcp.tool(description="Logs three messages")
    async def test_tool_with_logging(ctx: Context) -> str:
        await ctx.info("Tool execution started")
        await asyncio.sleep(0.05)
        await ctx.info("Tool processing data")
        await asyncio.sleep(0.05)
        await ctx.info("Tool execution completed")
        return "Logging tool finished"

    @mcp.tool(description="Always fails")
    def test_error_handling() -> str:
        raise RuntimeError("This tool intentionally returns an error for testing")

    @mcp.tool(description="Reports progress")
    async def test_tool_with_progress(ctx: Context) -> str:
        for p in (0, 50, 100):
            await ctx.report_progress(p, 100)
            if p < 100:
                await asyncio.sleep(0.05)
        return "Progress tool finished"

    @mcp.tool(description="Closes its SSE stream mid-call; the answer comes on the resumed stream")
    async def test_reconnection(ctx: Context) -> str:
        await asyncio.sleep(0.05)
        await ctx.close_sse_stream()
        await asyncio.sleep(0.3)
        return "Reconnection test completed"

    @mcp.tool(description="Asks the client's LLM")
    async def test_sampling(prompt: str, ctx: Context) -> str:
        result = await ctx.session.create_message(
            [SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
            max_tokens=100,
            related_request_id=ctx.request_id,
        )
        text = getattr(result.content, "text", str(result.content))
        return f"LLM response: {text}"

    @mcp.tool(description="Asks the user")
    async def test_elicitation(message: str, ctx: Context) -> str:
        result = await ctx.session.elicit_form(
            message,
            {
                "type": "object",
                "properties": {
                    "username": {"type": "string", "description": "User's response"},
                    "email": {"type": "string", "description": "User's email address"},
                },
                "required": ["username", "email"],
            },
            related_request_id=ctx.request_id,
        )
        return f"User response: action={result.action}, content={json.dumps(result.content)}"

    @mcp.tool(description="Elicitation with defaults")
    async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
        result = await ctx.session.elicit_form(
            "Please review the defaults",
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "default": "John Doe"},
                    "age": {"type": "integer", "default": 30},
                    "score": {"type": "number", "default": 95.5},
                    "status": {
                        "type": "string",
                        "enum": ["active", "inactive", "pending"],
                        "default": "active",
                    },
                    "verified": {"type": "boolean", "default": True},
                },
            },
            related_request_id=ctx.request_id,
        )
        return f"Elicitation completed: action={result.action}, content={json.dumps(result.content)}"

    @mcp.tool(description="Elicitation with enums")
    async def test_elicitation_sep1330_enums(ctx: Context) -> str:
        result = await ctx.session.elicit_form(
            "Pick options",
            {
                "type": "object",
                "properties": {
                    "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
                    "titledSingle": {
                        "type": "string",
                        "oneOf": [
                            {"const": "value1", "title": "First Option"},
                            {"const": "value2", "title": "Second Option"},
                            {"const": "value3", "title": "Third Option"},
                        ],
                    },
                    "legacyEnum": {
                        "type": "string",
                        "enum": ["opt1", "opt2", "opt3"],
                        "enumNames": ["Option One", "Option Two", "Option Three"],
                    },
                    "untitledMulti": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
                    },
                    "titledMulti": {
                        "type": "array",
                        "items": {
                            "anyOf": [
                                {"const": "value1", "title": "First Choice"},
                                {"const": "value2", "title": "Second Choice"},
                                {"const": "value3", "title": "Third Choice"},
                            ]
                        },
                    },
                },
            },
            related_request_id=ctx.request_id,
        )
        return f"Elicitation completed: action={result.action}, content={json.dumps(result.content)}"

    @mcp.resource("test://static-text", name="static-text", description="Static text", mime_type="text/plain")
    def static_text() -> str:
        return "This is the content of the static text resource."

    @mcp.resource("test://static-binary", name="static-binary", description="Static binary", mime_type="image/png")
    def static_binary() -> bytes:
        return base64.b64decode(PNG)

    @mcp.resource("test://watched-resource", name="watched-resource", description="Watched", mime_type="text/plain")
    def watched() -> str:
        return "watched"

    @mcp.resource(
        "test://template/{id}/data", name="template", description="Template", mime_type="application/json"
    )
    def template(id: str) -> str:
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @mcp.prompt(description="A simple prompt")
    def test_simple_prompt() -> str:
        return "This is a simple prompt for testing."

    @mcp.prompt(description="A prompt with arguments")
    def test_prompt_with_arguments(arg1: str, arg2: str) -> str:
        return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"

    @mcp.prompt(description="A prompt with an embedded resource")
    def test_prompt_with_embedded_resource(resourceUri: str) -> list:
        return [
            UserMessage(
                content=EmbeddedResource(
                    type="resource",
                    resource=TextResourceContents(
                        uri=resourceUri, mimeType="text/plain", text="Embedded resource content for testing."
                    ),
                )
            ),
            UserMessage(content=TextContent(type="text", text="Please process the embedded resource above.")),
        ]

    @mcp.prompt(description="A prompt with an image")
    def test_prompt_with_image() -> list:
        return [
            UserMessage(content=ImageContent(type="image", data=PNG, mimeType="image/png")),
            UserMessage(content=TextContent(type="text", text="Please analyze the image above.")),
        ]

    @mcp.completion()
    async def complete(ref, argument, context):
        return Completion(values=["paris", "park", "party"], total=3, hasMore=False)

    return mcp


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--hostname", default="mcp.internal.test")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    args = p.parse_args()
    import uvicorn
    from mcp.server.transport_security import TransportSecuritySettings

    mcp = build(args.hostname, args.port)
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{args.hostname}:{args.port}", f"{args.hostname}:*", "localhost:*", "127.0.0.1:*"],
        allowed_origins=[f"https://{args.hostname}:{args.port}", "http://localhost:*", "http://127.0.0.1:*"],
    )
    app = mcp.streamable_http_app(
        transport_security=security, host=args.hostname, event_store=event_store(), retry_interval=200
    )
    uvicorn.run(app, host=args.bind, port=args.port, ssl_certfile=args.cert, ssl_keyfile=args.key, log_level="warning")


if __name__ == "__main__":
    main()
