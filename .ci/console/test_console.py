#!/usr/bin/env python3
"""The admin console end to end in headless Chromium (see run.sh)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select, WebDriverWait

SECRET = "demo-secret"  # the fake partner's accepted secret; must never be rendered


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_http(url, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except Exception:
            time.sleep(0.1)
    sys.exit(f"{url} did not answer within {seconds} s")


def main():
    started = time.time()
    binary = os.path.abspath(sys.argv[1])
    work = tempfile.mkdtemp(prefix="console-test-")
    port, partner_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    partner = subprocess.Popen(
        [sys.executable, "tests/fakes/setu_partner.py", str(partner_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_") and k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(BROKER_LISTEN=f"127.0.0.1:{port}", DATABASE_URL=f"sqlite://{work}/broker.db",
               BROKER_ALLOW_INSECURE_ISSUERS="true", RUST_LOG="warn")
    out = open(os.path.join(work, "stdout.txt"), "w+")
    broker = subprocess.Popen([binary, "serve"], env=env, stdout=out,
                              stderr=open(os.path.join(work, "stderr.txt"), "w"))
    driver = None
    try:
        wait_http(f"{base}/healthz")
        out.seek(0)
        printed = out.read()
        found = re.search(r"\btbadmin_[0-9A-Za-z]{43}\b", printed)
        assert found, f"the first start printed no admin token: {printed!r}"
        admin_token = found.group(0)

        with urllib.request.urlopen(f"{base}/admin/console") as r:
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
            assert "unsafe-inline" not in csp, csp
            assert r.headers["x-frame-options"] == "DENY"
            assert r.headers["x-content-type-options"] == "nosniff"
            assert "<script>" not in r.read().decode()

        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1400,900",
                     f"--user-data-dir={work}/chromium"]:
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
        wait = WebDriverWait(driver, 15)
        by_id = lambda i: wait.until(EC.visibility_of_element_located((By.ID, i)))

        # A signed-out visitor sees the sign-in form and nothing else: no navigation, no
        # "Sign out".
        driver.get(f"{base}/admin/console")
        by_id("signin-token")
        for hidden in ["nav", "nav-tenants", "nav-callers", "nav-audit", "sign-out"]:
            assert not driver.find_element(By.ID, hidden).is_displayed(), \
                f"{hidden} shows on the sign-in page"

        # A wrong token is refused with the broker's problem code; the right one signs in.
        by_id("signin-token").send_keys("tbadmin_wrong")
        driver.find_element(By.ID, "signin-submit").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "signin-error"), "unauthorized"))
        by_id("signin-token").send_keys(admin_token)
        driver.find_element(By.ID, "signin-submit").click()
        by_id("new-tenant").click()

        # Register a Setu-style tenant through the form.
        by_id("t-id").send_keys("acme-setu")
        driver.find_element(By.ID, "t-name").send_keys("Acme (Setu)")
        Select(driver.find_element(By.ID, "t-kind")).select_by_value("setu_partner")
        driver.find_element(By.ID, "t-token-url").send_keys(f"http://127.0.0.1:{partner_port}/auth/token")
        driver.find_element(By.ID, "t-cred-client_id").send_keys("acme")
        driver.find_element(By.ID, "t-cred-client_secret").send_keys(SECRET)
        driver.find_element(By.ID, "t-submit").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "tenant-title"), "acme-setu"))
        assert driver.find_element(By.CSS_SELECTOR, "#tenant-health .badge").get_attribute("data-health") == "none"

        # Test the credentials: the tenant turns healthy, with a token and one mint.
        driver.find_element(By.ID, "test-credentials").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "tenant-result"), "accepted"))
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#tenant-health .badge").get_attribute("data-health") == "ok")
        details = driver.find_element(By.ID, "tenant-details").text
        assert "Mints (1 h)\n1" in details, details
        # Rotate the credentials: secret fields are write-only password inputs.
        driver.find_element(By.ID, "rotate-credentials").click()
        secret_input = by_id("r-cred-client_secret")
        assert secret_input.get_attribute("type") == "password"
        driver.find_element(By.ID, "r-cred-client_id").send_keys("acme-2")
        secret_input.send_keys(SECRET)
        driver.find_element(By.ID, "rotate-submit").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "tenant-result"), "Credentials replaced"))
        driver.find_element(By.ID, "test-credentials").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "tenant-result"), "accepted"))

        # A partner that wants a signed assertion and DPoP: the key comes from a file picker.
        driver.find_element(By.ID, "nav-tenants").click()
        by_id("new-tenant").click()
        by_id("t-id").send_keys("bank-pkjwt")
        Select(driver.find_element(By.ID, "t-kind")).select_by_value("oauth2_client_credentials")
        Select(driver.find_element(By.ID, "t-auth-method")).select_by_value("private_key_jwt")
        assert not driver.find_elements(By.ID, "t-cred-client_secret"), "private_key_jwt has no secret field"
        driver.find_element(By.ID, "t-token-url").send_keys("https://bank.example.com/oauth2/token")
        driver.find_element(By.ID, "t-cred-client_id").send_keys("broker")
        key_file = os.path.abspath("tests/fixtures/ec1.pem")
        driver.find_element(By.ID, "t-cred-private_key-file").send_keys(key_file)
        wait.until(lambda d: "BEGIN PRIVATE KEY" in d.find_element(By.ID, "t-cred-private_key").get_attribute("value"))
        driver.find_element(By.ID, "t-dpop").click()
        driver.find_element(By.ID, "t-submit").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "tenant-title"), "bank-pkjwt"))
        req = urllib.request.Request(f"{base}/admin/v1/tenants/bank-pkjwt", headers={"authorization": f"Bearer {admin_token}"})
        made = json.loads(urllib.request.urlopen(req).read())
        assert made["issuer"]["auth_method"] == "private_key_jwt" and made["issuer"]["dpop"] is True, made
        assert made["credential_fields"] == ["client_id", "dpop_private_key", "private_key"], made
        key_line = open(key_file).read().splitlines()[1]
        assert key_line not in driver.page_source, "the private key is rendered"

        driver.find_element(By.ID, "nav-tenants").click()
        row = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, 'tr[data-tenant="acme-setu"]')))
        assert row.find_element(By.CSS_SELECTOR, ".badge").get_attribute("data-health") == "ok"
        assert row.find_elements(By.TAG_NAME, "progress"), "the token's time left is shown as a bar"

        # A caller: its key is shown once, in the scanner-friendly shape.
        driver.find_element(By.ID, "nav-callers").click()
        by_id("c-name").send_keys("billing")
        driver.find_element(By.ID, "c-tenants").send_keys("acme-setu")
        driver.find_element(By.ID, "c-submit").click()
        key = by_id("new-api-key").text
        assert re.fullmatch(r"tbk_[0-9A-Za-z]{49}", key), key
        wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "tr[data-caller]")))

        # A second caller, deleted again (after the confirmation dialog).
        by_id("c-name").send_keys("short-lived")
        driver.find_element(By.ID, "c-tenants").send_keys("*")
        driver.find_element(By.ID, "c-submit").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr[data-caller]")) == 2)
        doomed = [r for r in driver.find_elements(By.CSS_SELECTOR, "tr[data-caller]") if "short-lived" in r.text][0]
        doomed.find_element(By.CSS_SELECTOR, "button.danger").click()
        wait.until(EC.alert_is_present()).accept()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr[data-caller]")) == 1)

        # The key works for a token.
        req = urllib.request.Request(f"{base}/v1/tenants/acme-setu/token", headers={"authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req) as r:
            assert r.status == 200

        # The audit trail shows the caller's creation and the tenant's registration.
        driver.find_element(By.ID, "nav-audit").click()
        wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, 'tr[data-action="caller.create"]')))
        assert driver.find_elements(By.CSS_SELECTOR, 'tr[data-action="tenant.create"]')
        by_id("a-tenant").send_keys("acme-setu")
        driver.find_element(By.ID, "a-apply").click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, 'tr[data-action="caller.create"]'))

        # Back on the tenant list for the screenshot; nothing secret on any page.
        driver.find_element(By.ID, "nav-tenants").click()
        wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, 'tr[data-tenant="acme-setu"] progress')))
        shot = os.path.join(work, "console.png")
        driver.save_screenshot(shot)
        if os.environ.get("CONSOLE_SCREENSHOT"):
            shutil.copy(shot, os.environ["CONSOLE_SCREENSHOT"])
        for page in ["#/tenants", "#/tenants/acme-setu", "#/callers", "#/audit"]:
            driver.get(f"{base}/admin/console{page}")
            time.sleep(0.3)
            source = driver.page_source
            assert SECRET not in source and admin_token not in source, f"a secret is rendered on {page}"

        # Signing out forgets the token, and the navigation goes with it.
        driver.find_element(By.ID, "sign-out").click()
        by_id("signin-token")
        assert driver.execute_script("return sessionStorage.length") == 0
        assert not driver.find_element(By.ID, "nav").is_displayed(), "nav shows after signing out"

        problems = [e for e in driver.get_log("browser")
                    if e["level"] == "SEVERE" and "401" not in e["message"]]
        assert not problems, f"the browser logged errors (CSP violations or script errors): {problems}"
        print(f"console test passed in {time.time() - started:.1f} s; screenshot: {shot}")
    except Exception:
        if driver is not None:
            driver.save_screenshot(os.path.join(work, "failure.png"))
            print(f"failure screenshot: {work}/failure.png", file=sys.stderr)
        print(open(os.path.join(work, "stderr.txt")).read()[-3000:], file=sys.stderr)
        raise
    finally:
        if driver is not None:
            driver.quit()
        broker.terminate()
        partner.terminate()
        broker.wait(10)


if __name__ == "__main__":
    main()
