//! A service connection string, `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…` (parts in
//! any order and case), and the policy SAS token it signs: what `iothubd monitor-events` and
//! `iothubd simulate` log in with.

use anyhow::Context;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConnectionString {
    pub host_name: String,
    pub key_name: String,
    pub key: String,
}

impl ServiceConnectionString {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let (mut host_name, mut key_name, mut key) = (None, None, None);
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            // Keys end in base64 padding, so only the first `=` separates name from value.
            let (name, value) = part.split_once('=').with_context(|| format!("'{part}' is not Name=value"))?;
            let slot = match name.trim().to_ascii_lowercase().as_str() {
                "hostname" => &mut host_name,
                "sharedaccesskeyname" => &mut key_name,
                "sharedaccesskey" => &mut key,
                _ => continue,
            };
            *slot = Some(value.trim().to_owned());
        }
        let need = |v: Option<String>, what: &str| {
            v.filter(|v| !v.is_empty()).with_context(|| format!("the connection string has no {what}"))
        };
        Ok(Self {
            host_name: need(host_name, "HostName")?,
            key_name: need(key_name, "SharedAccessKeyName")?,
            key: need(key, "SharedAccessKey")?,
        })
    }

    /// A policy token for the whole hub, valid for `lifetime_secs` from now.
    pub fn token(&self, lifetime_secs: u64) -> anyhow::Result<String> {
        let expiry = crate::http::service::unix_now() + lifetime_secs;
        super::sas::sign(&self.host_name, &self.key, expiry, Some(&self.key_name))
            .map_err(|_| anyhow::anyhow!("the connection string's SharedAccessKey is not base64"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_string_parts_in_any_order_and_case() {
        let cs = ServiceConnectionString::parse("sharedaccesskey=abc=;HostName=h.example;SharedAccessKeyName=service")
            .expect("valid");
        assert_eq!(
            cs,
            ServiceConnectionString { host_name: "h.example".into(), key_name: "service".into(), key: "abc=".into() }
        );
        assert!(ServiceConnectionString::parse("HostName=h;SharedAccessKey=k").is_err());
        let login =
            ServiceConnectionString::parse("SharedAccessKey=abc=;hostname=h.example;SharedAccessKeyName=iothubowner")
                .expect("parses");
        assert_eq!(login.host_name, "h.example");
        assert_eq!(login.key, "abc=");
        assert!(login.token(60).is_ok_and(|t| t.contains("skn=iothubowner")));
    }
}
