// The curl command and the Python (openai SDK) program that send exactly the console's request.

/** A JSON value as a Python literal (JSON string escapes are valid in Python strings). */
export function py(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    if (!value.some((item) => item && typeof item === "object")) {
      return `[${value.map((item) => py(item, indent)).join(", ")}]`;
    }
    return `[\n${value.map((item) => `${inner}${py(item, inner)},`).join("\n")}\n${indent}]`;
  }
  const entries = Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${py(v, indent)}`);
  return `{${entries.join(", ")}}`;
}

function kwargs(body) {
  return Object.entries(body).map(([k, v]) => `    ${k}=${py(v, "    ")},`).join("\n");
}

export function curl(origin, endpoint, body, auth) {
  const json = JSON.stringify(body, null, 2).replaceAll("'", "'\\''");
  return [
    `curl ${body.stream ? "-N " : ""}${origin}${endpoint} \\`,
    auth ? '  -H "Authorization: Bearer $MODELYARD_API_KEY" \\' : null,
    '  -H "Content-Type: application/json" \\',
    `  -d '${json}'`,
  ].filter((line) => line !== null).join("\n");
}

function client(origin, auth) {
  const key = auth ? 'os.environ["MODELYARD_API_KEY"]' : '"unused"';
  return [
    ...(auth ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    ...(auth ? [] : ["# Auth is off on this server: the SDK needs some api_key all the same."]),
    `client = OpenAI(base_url=${py(`${origin}/v1`)}, api_key=${key})`,
  ];
}

function generation(kind, body) {
  const method = kind === "chat" ? "client.chat.completions.create" : "client.completions.create";
  const piece = kind === "chat" ? "chunk.choices[0].delta.content or \"\"" : "chunk.choices[0].text";
  const whole = kind === "chat" ? "response.choices[0].message.content" : "response.choices[0].text";
  if (body.stream) {
    return [
      `stream = ${method}(`, kwargs(body), ")",
      "for chunk in stream:",
      "    if chunk.choices:",
      `        print(${piece}, end="", flush=True)`,
      "print()",
    ];
  }
  return [`response = ${method}(`, kwargs(body), ")", `print(${whole})`];
}

export function python(origin, task, body, auth) {
  const lines = [...client(origin, auth), ""];
  if (task === "chat" || task === "completion") {
    lines.push(...generation(task, body));
  } else if (task === "embeddings") {
    lines.push(
      "response = client.embeddings.create(", kwargs(body), ")",
      "a, b = (item.embedding for item in response.data)",
      "dot = sum(x * y for x, y in zip(a, b))",
      "norms = sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5",
      'print(f"cosine similarity: {dot / norms:.4f}")',
    );
  } else {
    lines.push(
      "# /v1/classify is a modelyard extension: the SDK's generic post() sends it.",
      `response = client.post("/classify", cast_to=object, body=${py(body)})`,
      'for label in response["data"][0]["labels"]:',
      '    print(label["label"], round(label["score"], 4))',
    );
  }
  return lines.join("\n");
}
