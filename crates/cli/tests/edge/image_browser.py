"""Drives the image tab of the `lsplit edge` page in Debian's headless Chromium (chromedriver).

Usage: image_browser.py BASE_URL PROMPT NEGATIVE SIZE STEPS SEED SCREENSHOT_DIR
Opens the image tab, generates with a preview after every step, records every step count the
page showed, waits for the final image, reads the step tensor heat maps back from their canvases,
saves screenshots (wide and narrow), and prints what it saw as one JSON object.
"""

import json
import os
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base_url, prompt, negative, size, steps, seed, shots = sys.argv[1:8]
os.makedirs(shots, exist_ok=True)

options = webdriver.ChromeOptions()
options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
             "--window-size=1280,900"):
    options.add_argument(flag)
service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
driver = webdriver.Chrome(options=options, service=service)
out = {}


def text(element_id):
    return driver.find_element(By.ID, element_id).text


def fill(element_id, value):
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def screenshot(width, path):
    """Saves the whole page as laid out `width` pixels wide."""
    driver.set_window_size(width, 900)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height + 140)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(path)


try:
    wait = WebDriverWait(driver, 120)
    driver.get(base_url + "/")
    wait.until(lambda d: "image model" in d.find_element(By.ID, "image-chips").get_attribute("textContent"))
    driver.find_element(By.ID, "tab-image").click()
    out["notice_hidden"] = driver.find_element(By.ID, "image-notice").get_attribute("hidden") is not None
    out["chips"] = text("image-chips")
    out["default_size"] = driver.find_element(By.ID, "image-size").get_attribute("value")
    out["default_steps"] = driver.find_element(By.ID, "image-steps").get_attribute("value")
    out["default_guidance"] = driver.find_element(By.ID, "image-guidance").get_attribute("value")

    driver.find_element(By.ID, "image-prompt").send_keys(prompt)
    fill("image-negative", negative)
    fill("image-size", size)
    fill("image-steps", steps)
    fill("image-seed", seed)
    fill("image-preview-every", "1")
    # Every step count the page shows, as it shows it (old values of each change, then the last).
    driver.execute_script("""
        window.lsplitSteps = [];
        window.lsplitStepObserver = new MutationObserver((records) => {
            for (const r of records) window.lsplitSteps.push(r.oldValue);
        });
        window.lsplitStepObserver.observe(document.getElementById("image-step"),
            {attributes: true, attributeFilter: ["data-step"], attributeOldValue: true});
    """)
    driver.find_element(By.ID, "image-go").click()
    wait.until(lambda d: d.find_element(By.ID, "image-status").get_attribute("data-state") in ("done", "error"))
    out["status"] = text("image-status")
    out["state"] = driver.find_element(By.ID, "image-status").get_attribute("data-state")
    seen = driver.execute_script("return window.lsplitSteps")
    seen.append(driver.find_element(By.ID, "image-step").get_attribute("data-step"))
    out["steps_seen"] = sorted({int(s) for s in seen if s is not None})
    out["step_text"] = text("image-step")
    out["previews"] = len(driver.find_elements(By.CSS_SELECTOR, "#image-previews img"))
    shown = driver.find_element(By.ID, "image-shown")
    out["final"] = shown.get_attribute("data-final")
    out["final_src"] = shown.get_attribute("src")
    out["seed_used"] = text("image-seed-used")
    out["bytes"] = {key: text("image-bytes-" + key) for key in ("setup", "up", "down")}
    out["wire_label"] = text("image-wire-label")
    # The heat maps: how many, the step they show, and how many distinct colours each holds.
    out["tensor_maps"] = driver.execute_script("""
        return Array.from(document.querySelectorAll("#tensor-maps canvas"), (c) => {
            const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            const colours = new Set();
            for (let i = 0; i < data.length; i += 4) colours.add(data[i] + "," + data[i + 1] + "," + data[i + 2]);
            return {width: c.width, height: c.height, step: c.dataset.step, colours: colours.size,
                    shown_width: c.clientWidth};
        });
    """)
    out["map_captions"] = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#tensor-maps figcaption")]

    wide = os.path.join(shots, "edge-image-tab-wide.png")
    screenshot(1280, wide)
    narrow = os.path.join(shots, "edge-image-tab-narrow.png")
    screenshot(390, narrow)
    out["narrow_overflow"] = driver.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth")
    out["screenshots"] = [wide, narrow]

    # The chat tab still works beside the image tab.
    driver.set_window_size(1280, 900)
    driver.find_element(By.ID, "tab-chat").click()
    out["chat_visible"] = driver.find_element(By.ID, "pane-chat").is_displayed()
    out["image_hidden"] = not driver.find_element(By.ID, "pane-image").is_displayed()
    out["console_errors"] = [
        entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"
    ]
finally:
    driver.quit()
print(json.dumps(out))
