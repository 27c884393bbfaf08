//! Superset's webhook requests, built exactly as `superset/reports/notifications/webhook.py`
//! (6.x) and the `requests`/`urllib3` libraries under it build them:
//!
//! - with files, `requests.post(url, data=payload, files=files)`: `multipart/form-data` with a
//!   fresh random boundary (urllib3's `choose_boundary()`, 32 hex digits) per attempt; the data
//!   fields first in the payload's order (`name`, `header` as `json.dumps(...)`, `text`,
//!   `description`, `url`), a field whose value is `None` left out, each part with only a
//!   `Content-Disposition: form-data; name="…"` header; then one `files` part per file with its
//!   `filename` and `Content-Type`: `report.csv`, `report.xlsx`, `report.pdf`,
//!   `screenshot_0.png`, `screenshot_1.png`, …;
//! - without files, `requests.post(url, json=payload)`: `json.dumps` with Python's default
//!   separators (`", "`, `": "`) and `ensure_ascii` (non-ASCII as `\uXXXX`), `None` as `null`.

#![allow(dead_code)]

use std::fmt::Write as _;

/// One notification's content (Superset's `NotificationContent` as the webhook reads it).
#[derive(Debug, Clone)]
pub struct Notification {
    /// `name`: the report's name (or `Error occurred for Report: …`).
    pub name: String,
    /// `header.notification_format`: `PNG`, `PDF`, `CSV`, `TEXT`.
    pub format: &'static str,
    /// `header.notification_type`: `Report` or `Alert`.
    pub notification_type: &'static str,
    /// `header.notification_source`: `dashboard` or `chart`.
    pub source: &'static str,
    /// `header.chart_id`.
    pub chart_id: Option<i64>,
    /// `header.dashboard_id`.
    pub dashboard_id: Option<i64>,
    /// `text`: "Contact the report owner for error details." on an error, else `None`.
    pub text: Option<String>,
    /// `description`.
    pub description: Option<String>,
    /// `url`.
    pub url: Option<String>,
    /// `csv` bytes.
    pub csv: Option<Vec<u8>>,
    /// `xlsx` bytes.
    pub xlsx: Option<Vec<u8>>,
    /// `pdf` bytes.
    pub pdf: Option<Vec<u8>>,
    /// `screenshots`, in order.
    pub screenshots: Vec<Vec<u8>>,
}

impl Notification {
    /// A dashboard report named `name` with a description and a link, and no file yet.
    pub fn report(name: &str) -> Self {
        Self {
            name: name.into(),
            format: "PNG",
            notification_type: "Report",
            source: "dashboard",
            chart_id: None,
            dashboard_id: Some(7),
            text: None,
            description: Some("Numbers for the ops team".into()),
            url: Some("https://superset.example.com/superset/dashboard/7/".into()),
            csv: None,
            xlsx: None,
            pdf: None,
            screenshots: Vec::new(),
        }
    }

    /// `_get_files()`: (field, (filename, bytes, content type)), in webhook.py's order.
    pub fn files(&self) -> Vec<(String, Vec<u8>, &'static str)> {
        let mut files = Vec::new();
        if let Some(csv) = &self.csv {
            files.push(("report.csv".to_owned(), csv.clone(), "text/csv"));
        }
        if let Some(xlsx) = &self.xlsx {
            files.push((
                "report.xlsx".to_owned(),
                xlsx.clone(),
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            ));
        }
        if let Some(pdf) = &self.pdf {
            files.push(("report.pdf".to_owned(), pdf.clone(), "application/pdf"));
        }
        for (i, png) in self.screenshots.iter().enumerate() {
            files.push((format!("screenshot_{i}.png"), png.clone(), "image/png"));
        }
        files
    }

    /// `json.dumps(header_content)`.
    fn header_json(&self) -> String {
        let id = |v: Option<i64>| v.map_or_else(|| "null".to_owned(), |v| v.to_string());
        format!(
            "{{\"notification_format\": {}, \"notification_type\": {}, \"notification_source\": {}, \"chart_id\": {}, \"dashboard_id\": {}}}",
            py_str(self.format),
            py_str(self.notification_type),
            py_str(self.source),
            id(self.chart_id),
            id(self.dashboard_id)
        )
    }

    /// The request Superset sends: its Content-Type and body, with a new random boundary for a
    /// multipart body (as each retry gets).
    pub fn request(&self) -> (String, Vec<u8>) {
        let boundary: String = (0..16)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        self.request_with_boundary(&boundary)
    }

    /// [`Notification::request`] with a given multipart boundary.
    pub fn request_with_boundary(&self, boundary: &str) -> (String, Vec<u8>) {
        let files = self.files();
        if files.is_empty() {
            let opt = |v: &Option<String>| v.as_deref().map_or_else(|| "null".to_owned(), py_str);
            let body = format!(
                "{{\"name\": {}, \"header\": {}, \"text\": {}, \"description\": {}, \"url\": {}}}",
                py_str(&self.name),
                self.header_json(),
                opt(&self.text),
                opt(&self.description),
                opt(&self.url)
            );
            return ("application/json".to_owned(), body.into_bytes());
        }
        let mut body = Vec::new();
        let header = self.header_json();
        let fields: [(&str, Option<&str>); 5] = [
            ("name", Some(&self.name)),
            ("header", Some(&header)),
            ("text", self.text.as_deref()),
            ("description", self.description.as_deref()),
            ("url", self.url.as_deref()),
        ];
        for (name, value) in fields {
            let Some(value) = value else { continue };
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
                    .as_bytes(),
            );
            body.extend_from_slice(value.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        for (file_name, bytes, content_type) in files {
            body.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{file_name}\"\r\nContent-Type: {content_type}\r\n\r\n"
                )
                .as_bytes(),
            );
            body.extend_from_slice(&bytes);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={boundary}"), body)
    }
}

/// A Python `json.dumps` string: `ensure_ascii`, so every non-ASCII character is `\uXXXX`
/// (UTF-16 code units).
pub fn py_str(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
    out
}

/// The HTTP client Superset's `requests` amounts to: a 60 s timeout, no redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("python-requests/2.32.3")
        .build()
        .unwrap()
}

/// Sends `notification` to `url` as Superset does; the status and the JSON body.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    notification: &Notification,
) -> (u16, serde_json::Value) {
    let (content_type, body) = notification.request();
    let response = client
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}
