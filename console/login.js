// Vigil console sign-in. This page holds no data: the console itself (/console/app.js) is served
// only with an operator token, which is kept in this tab's session storage and sent as a bearer
// token with every call.
"use strict";

const TOKEN_KEY = "vigil-console-token";

async function startConsole(token) {
  const error = document.getElementById("sign-in-error");
  error.textContent = "";
  let response;
  try {
    response = await fetch("/console/app.js", { headers: { authorization: "Bearer " + token } });
  } catch (e) {
    error.textContent = "Vigil cannot be reached: " + e;
    return false;
  }
  if (response.status === 401) {
    error.textContent = "Vigil does not know this token.";
    return false;
  }
  if (response.status === 403) {
    error.textContent = "This token's client does not have the operator role.";
    return false;
  }
  if (!response.ok) {
    error.textContent = "Vigil answered " + response.status + ".";
    return false;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  const code = await response.blob();
  const script = document.createElement("script");
  script.src = URL.createObjectURL(code);
  document.body.appendChild(script);
  return true;
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("sign-in");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    startConsole(document.getElementById("token").value.trim());
  });
  document.getElementById("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.hash = "";
    location.reload();
  });
  const kept = sessionStorage.getItem(TOKEN_KEY);
  if (kept) {
    startConsole(kept);
  }
});
