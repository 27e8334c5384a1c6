"""Drives the `lsplit edge` page in Debian's headless Chromium through chromedriver (WebDriver).

Usage: browser.py BASE_URL PROMPT SCREENSHOT_DIR
Loads the page, sends a prompt, waits for streamed tokens, the per-token timing breakdown and
the wire heat maps, saves screenshots (wide and narrow), checks the narrow layout does not
overflow, tries the image tab, and prints what it saw as one JSON object.
"""

import json
import os
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

base_url, prompt, shots = sys.argv[1:4]
os.makedirs(shots, exist_ok=True)

options = webdriver.ChromeOptions()
options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
             "--window-size=1280,900"):
    options.add_argument(flag)
service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
driver = webdriver.Chrome(options=options, service=service)
out = {}


def screenshot(width, path):
    """Saves the whole page as laid out `width` pixels wide."""
    driver.set_window_size(width, 900)
    driver.execute_script("drawBreakdown()")
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height + 140)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(path)


try:
    wait = WebDriverWait(driver, 120)
    driver.get(base_url + "/")
    wait.until(lambda d: "model" in d.find_element(By.ID, "chips").text)
    out["chips"] = driver.find_element(By.ID, "chips").text
    out["split_layers"] = len(driver.find_elements(By.CSS_SELECTOR, "#split-bar .layer"))
    out["trunk_layers"] = len(driver.find_elements(By.CSS_SELECTOR, "#split-bar .layer.trunk"))

    driver.find_element(By.ID, "s-max_tokens").clear()
    driver.find_element(By.ID, "s-max_tokens").send_keys("24")
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    # Tokens arrive one by one: record, as the page updates, how many tokens it showed while
    # the status still said "running" (a reply shown all at once would show them only when
    # done). A MutationObserver sees every update, however fast the model.
    driver.execute_script("""
        window.lsplitSeen = [];
        new MutationObserver(() => {
            const state = document.getElementById("status").dataset.state;
            const tokens = document.getElementById("token-count").dataset.tokens;
            window.lsplitSeen.push(state + ":" + tokens);
        }).observe(document.getElementById("token-count"), {attributes: true});
    """)
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    seen = driver.execute_script("return window.lsplitSeen")
    out["streaming_seen"] = sorted({int(s.split(":")[1]) for s in seen if s.startswith("running:")})
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    out["status"] = driver.find_element(By.ID, "status").text
    out["reply"] = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text
    out["meta"] = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text
    out["tokens"] = int(driver.find_element(By.ID, "token-count").get_attribute("data-tokens"))
    out["totals"] = {
        key: driver.find_element(By.ID, key).text
        for key in ("t-head", "t-trunk", "t-tail", "bytes-up", "bytes-down")
    }
    out["heat_rows"] = {
        which: int(driver.find_element(By.ID, "heat-" + which).get_attribute("data-rows"))
        for which in ("up", "down")
    }
    out["heat_up_label"] = driver.find_element(By.ID, "heat-up-label").text
    wide = os.path.join(shots, "edge-page-wide.png")
    screenshot(1280, wide)

    narrow = os.path.join(shots, "edge-page-narrow.png")
    screenshot(390, narrow)
    out["narrow_overflow"] = driver.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth")

    driver.set_window_size(1280, 900)
    driver.find_element(By.ID, "tab-image").click()
    out["image_notice"] = driver.find_element(By.ID, "image-notice").text
    driver.find_element(By.ID, "image-prompt").send_keys("a lighthouse at dusk")
    driver.find_element(By.ID, "image-go").click()
    wait.until(lambda d: d.find_element(By.ID, "image-status").get_attribute("data-state") in ("done", "error"))
    out["image_status"] = driver.find_element(By.ID, "image-status").text
    out["image_state"] = driver.find_element(By.ID, "image-status").get_attribute("data-state")
    out["images_shown"] = len(driver.find_elements(By.CSS_SELECTOR, "#image-previews img, #image-shown[data-final]"))
    image = os.path.join(shots, "edge-page-image-tab.png")
    driver.save_screenshot(image)
    out["screenshots"] = [wide, narrow, image]
    out["console_errors"] = [
        entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"
        and "/lsplit/images/stream" not in entry["message"]
    ]
finally:
    driver.quit()
print(json.dumps(out))
