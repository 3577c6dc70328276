"""The chat page in a real headless browser: pick an easy-VQA image, ask, read the streamed answer.

Needs Debian's chromium (`apt-get install -y chromium`) and the `playwright` Python package
(`pip install playwright`; no `playwright install`: the system browser is used). Run with
`pytest -m browser tests/browser`.
"""

import base64
import os
import shutil

import pytest
import torch

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("NANOVLM_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from nanovlm import VLMConfig, VisionLanguageModel
    from nanovlm.serve.server import make_server

    torch.manual_seed(0)
    model = VisionLanguageModel(VLMConfig.from_preset("tiny"), load_backbone=False)
    with torch.no_grad():  # larger weights than the init, so the answer is visible text
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("browser") / "tiny"
    model.save_pretrained(path)
    srv = make_server(VisionLanguageModel.from_pretrained(path), port=0, model_name="tiny-browser").start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"no chromium at {CHROMIUM}; apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def easyvqa_image() -> tuple[str, str]:
    from easy_vqa import get_test_image_paths, get_test_questions

    questions, _, image_ids = get_test_questions()
    return get_test_image_paths()[image_ids[0]], questions[0]


def test_chat_page_streams_an_answer_about_an_uploaded_image(server, browser):
    import openai

    image_path, question = easyvqa_image()
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent.includes('tiny-browser')")
    page.set_input_files("#image-input", image_path)
    page.wait_for_selector("#drop img")  # the preview of the picked image
    page.fill("#max-tokens", "12")
    page.fill("#prompt", question)
    page.click("#send")
    answer = page.locator(".message.assistant").last
    page.wait_for_selector(".message.assistant[data-state='done']", timeout=30_000)
    text = answer.locator(".text").inner_text()
    assert not errors, errors
    assert "Error" not in text and text.strip(), text
    assert page.locator(".message.user img").count() == 1

    # The page asked what an API client asks (greedy), so the answers agree.
    with open(image_path, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        expected = client.chat.completions.create(
            model="tiny-browser", max_tokens=12, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": question}]}]).choices[0].message.content
    assert text.strip() == expected.strip()

    # A follow-up turn without an image goes through too (the history is resent).
    page.fill("#prompt", "and its shape?")
    page.press("#prompt", "Enter")  # Enter sends
    page.wait_for_function("document.querySelectorAll(\".message.assistant[data-state='done']\").length == 2",
                           timeout=30_000)
    assert page.locator(".message.assistant").nth(1).locator(".text").inner_text().strip()
    assert not errors, errors
    page.close()
