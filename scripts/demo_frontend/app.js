// The demo frontend: plain JavaScript calling this site's HeadlessKey API cross-origin.
"use strict";

const cfg = window.HK;
const $ = (id) => document.getElementById(id);
const KEY = "hk-demo-token";

async function api(path, { method = "GET", body, token } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(cfg.api + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.message || ("HTTP " + response.status));
  return data;
}

function say(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = kind;
}

function b64url(text) {
  return btoa(unescape(encodeURIComponent(text))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function unb64url(text) {
  const padded = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  return decodeURIComponent(escape(atob(padded)));
}

async function show() {
  const token = sessionStorage.getItem(KEY);
  if (!token) {
    $("signed-out").hidden = false;
    $("signed-in").hidden = true;
    return;
  }
  try {
    const me = await api("/me", { token });
    $("display-name").textContent = me.display_name;
    $("login-name").textContent = me.user_login;
    $("email").textContent = me.user_email;
    $("roles").textContent = me.roles.join(", ");
    $("signed-out").hidden = true;
    $("signed-in").hidden = false;
  } catch (error) {
    sessionStorage.removeItem(KEY);
    say("Your session ended: " + error.message, "error");
    $("signed-out").hidden = false;
    $("signed-in").hidden = true;
  }
}

async function arriveBySso() {
  // The assertion travels in the URL fragment: never sent to a server, never in a Referer.
  const match = location.hash.match(/^#sso=([A-Za-z0-9_-]+)$/);
  if (!match) return;
  history.replaceState(null, "", location.pathname);
  say("Signing you in from the federation…");
  const assertion = JSON.parse(unb64url(match[1]));
  const login = await api("/sso/exchange", { method: "POST", body: assertion });
  sessionStorage.setItem(KEY, login.token);
  $("from").textContent = assertion.site_key;
  $("arrived").hidden = false;
  say("Signed in by single sign-on.", "ok");
}

$("register").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = Object.fromEntries(new FormData(event.target));
  try {
    await api("/register", { method: "POST", body: form });
    const login = await api("/token", { method: "POST", body: { username: form.username, password: form.password } });
    sessionStorage.setItem(KEY, login.token);
    say("Welcome! Your account was created and you are logged in.", "ok");
    await show();
  } catch (error) {
    say(error.message, "error");
  }
});

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = Object.fromEntries(new FormData(event.target));
  try {
    const login = await api("/token", { method: "POST", body: form });
    sessionStorage.setItem(KEY, login.token);
    say("Logged in.", "ok");
    await show();
  } catch (error) {
    say(error.message, "error");
  }
});

$("continue").addEventListener("click", async () => {
  try {
    const token = sessionStorage.getItem(KEY);
    const assertion = await api("/sso/issue", { method: "POST", body: { target: cfg.peer.key }, token });
    const payload = b64url(JSON.stringify({
      site_key: assertion.site_key, token: assertion.token, signature: assertion.signature,
    }));
    location.assign(cfg.peer.frontend + "/#sso=" + payload);
  } catch (error) {
    say(error.message, "error");
  }
});

$("logout").addEventListener("click", async () => {
  const token = sessionStorage.getItem(KEY);
  sessionStorage.removeItem(KEY);
  try { await api("/token/revoke", { method: "POST", body: { token } }); } catch (error) { /* quiet */ }
  say("Logged out.");
  await show();
});

document.title = cfg.name + " — HeadlessKey demo";
document.body.dataset.site = cfg.key;
$("site-name").textContent = cfg.name;
$("site-note").textContent = "A headless site of the demo federation";
$("here").textContent = cfg.name;
$("peer-name").textContent = cfg.peer.name;
$("api").textContent = cfg.api;
arriveBySso().catch((error) => say("Single sign-on failed: " + error.message, "error")).finally(show);
