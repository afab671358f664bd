"""`--mcp`: an AI assistant's MCP client (the `mcp` package) lists the app's tools, classifies images and rebuilds them."""
import ast
import asyncio
import base64
import io
from datetime import timedelta

import numpy as np
import pytest
from PIL import Image
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from conftest import served, write_image
from imagelab.inference import Predictor


def data_url(image):
    kind = {".jpg": "jpeg", ".png": "png"}[image.suffix]
    return f"data:image/{kind};base64,{base64.b64encode(image.read_bytes()).decode()}"


def over_mcp(url, work, timeout=120):
    """What `work(session)` returns, done over one MCP session with the app at `url` as an assistant's client does
    it; within `timeout` seconds, as the client alone is not: it waits for an answer as long as it takes, and drops
    a broken stream without a word."""
    async def session_work():
        async with streamable_http_client(url + "gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write, read_timeout_seconds=timedelta(seconds=timeout)) as session:
                await session.initialize()
                return await work(session)
    return asyncio.run(asyncio.wait_for(session_work(), timeout))


async def calls(session, tool_calls):
    """The tools listed, and the answer to each (tool, arguments) of `tool_calls` in turn."""
    tools = {t.name: t for t in (await session.list_tools()).tools}
    return tools, [await session.call_tool(tool, arguments) for tool, arguments in tool_calls]


def test_mcp_client_lists_predict_and_gets_the_models_label(tiny_model, tmp_path):
    images = [write_image(tmp_path / "red.jpg", (220, 60, 60), size=(120, 90)),
              write_image(tmp_path / "blue.png", (60, 60, 220), size=(120, 90))]
    with served(["apps/pets/app.py", "--model", tiny_model, "--mcp"]) as url:
        tools, results = over_mcp(url, lambda session: calls(session, [("predict", {"image": data_url(im)})
                                                                       for im in images]))
    # What an assistant reads to pick the tool: what the model tells apart.
    assert "cats" in tools["predict"].description and "dogs" in tools["predict"].description
    assert "top 3" not in tools["predict"].description  # a 2-class model answers with both classes
    assert "both classes with their probabilities" in tools["predict"].description
    assert "flag" not in tools  # flagging is off unless the app's owner turns it on
    expected = Predictor(tiny_model)
    for image, result in zip(images, results):
        assert not result.isError, result.content
        answer = ast.literal_eval(result.content[0].text)
        want = expected.predict(image, k=3)
        assert answer["label"] == max(want, key=want.get)
        assert {c["label"]: c["confidence"] for c in answer["confidences"]} == pytest.approx(want, abs=1e-5)


def test_mcp_client_rebuilds_and_blends_images_through_the_autoencoder(tiny_autoencoder, tmp_path):
    """The autoencoder's tools say what they do (the code's size, the pictures' size) and answer with the app's
    pictures, as PNG image content an assistant can show."""
    from imagelab.loading import open_model
    a = write_image(tmp_path / "a.jpg", (220, 60, 60), size=(120, 90))
    b = write_image(tmp_path / "b.png", (60, 60, 220), size=(90, 120))

    with served(["apps/autoencoder/app.py", "--model", tiny_autoencoder, "--mcp"]) as url:
        tools, results = over_mcp(url, lambda session: calls(session, [
            ("reconstruct", {"image": data_url(a)}),
            ("interpolate", {"a": data_url(a), "b": data_url(b), "steps": 4})]))
    assert "a code of 8 numbers" in tools["reconstruct"].description and "16x16" in tools["reconstruct"].description
    assert "evenly spaced" in tools["interpolate"].description
    ae = open_model(tiny_autoencoder, "autoencoder")
    for result, want in zip(results, [ae.reconstruct(a).reconstruction, ae.interpolate(a, b, 4)]):
        assert not result.isError, result.content
        [picture] = [c for c in result.content if c.type == "image"]
        assert picture.mimeType == "image/png"
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(picture.data))).convert("RGB"), int)
        assert got.shape == np.asarray(want).shape and np.abs(got - np.asarray(want, int)).max() == 0


def test_an_image_url_the_app_cannot_fetch_is_one_line_for_the_assistant(tiny_model, missing_pictures):
    with served(["apps/pets/app.py", "--model", tiny_model, "--mcp"]) as url:
        result = over_mcp(url, lambda session: session.call_tool("predict", {"image": missing_pictures}))
        assert result.isError and f"cannot download the image at {missing_pictures}" in result.content[0].text
        assert "Traceback" not in url.log.read_text()
