//! The operator API (hub management) and the `iothubd hub` CLI over it.

mod common;

use common::{API, start, unique_hub_name};
use iothubd::auth::sas;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn operator_api_needs_the_operator_key() {
    let hub = start();
    let r = hub.client.get(hub.url("/operator/hubs")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = hub.client.get(hub.url("/operator/hubs")).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn hub_lifecycle_create_get_update_delete() {
    let hub = start();
    let name = unique_hub_name();
    let body = json!({ "sku": { "name": "S1", "capacity": 2 }, "properties": {
        "eventHubEndpoints": { "events": { "partitionCount": 8, "retentionTimeInDays": 2 } },
        "routing": { "routes": [] } } });
    let r = hub.operator(Method::PUT, &format!("/operator/hubs/{name}")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["properties"]["hostName"], format!("{name}.azure-devices.net"));
    assert_eq!(created["properties"]["eventHubEndpoints"]["events"]["partitionCount"], 8);
    assert_eq!(created["properties"]["authorizationPolicies"].as_array().unwrap().len(), 5);
    assert_eq!(created["properties"]["routing"], json!({ "routes": [] }));

    let list: Value = hub.operator(Method::GET, "/operator/hubs").send().await.unwrap().json().await.unwrap();
    let names: Vec<&str> = list["value"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert!(names.contains(&name.as_str()) && names.contains(&hub.name.as_str()));

    // Same host name as an existing hub → 409; partition count is fixed → 400.
    let clash = json!({ "properties": { "hostName": hub.host } });
    let r = hub.operator(Method::PUT, "/operator/hubs/another1").json(&clash).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let mut changed = created.clone();
    changed["properties"]["eventHubEndpoints"]["events"]["partitionCount"] = json!(4);
    let r = hub.operator(Method::PUT, &format!("/operator/hubs/{name}")).json(&changed).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Update with a stale ETag → 412; with the current one → 200.
    let mut update = created.clone();
    update["sku"]["capacity"] = json!(3);
    let r = hub
        .operator(Method::PUT, &format!("/operator/hubs/{name}"))
        .header("If-Match", "\"stale\"")
        .json(&update)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = hub
        .operator(Method::PUT, &format!("/operator/hubs/{name}"))
        .header("If-Match", created["etag"].as_str().unwrap())
        .json(&update)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let got: Value =
        hub.operator(Method::GET, &format!("/operator/hubs/{name}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["sku"]["capacity"], 3);

    let r = hub.operator(Method::DELETE, &format!("/operator/hubs/{name}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = hub.operator(Method::GET, &format!("/operator/hubs/{name}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_new_hub_is_reached_by_its_host_name_and_deleting_it_deletes_its_data() {
    let hub = start();
    let name = unique_hub_name();
    let created: Value = hub
        .operator(Method::PUT, &format!("/operator/hubs/{name}"))
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let host = created["properties"]["hostName"].as_str().unwrap().to_owned();
    let key = created["properties"]["authorizationPolicies"][0]["primaryKey"].as_str().unwrap().to_owned();
    // A client dialling the new hub's host name gets a certificate for it from the dev CA.
    let client = common::client_for(hub.dir.path(), &host, hub.server.info.https);
    let token = sas::sign(&host, &key, common::unix_now() + 600, Some("iothubowner")).unwrap();
    let url = format!("https://{host}:{}/devices/only-here?{API}", hub.server.info.https.port());
    let r = client.put(&url).header("Authorization", &token).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The default hub does not see it.
    let r = hub.owner(Method::GET, "/devices/only-here").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let r = hub.operator(Method::DELETE, &format!("/operator/hubs/{name}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = hub.operator(Method::PUT, &format!("/operator/hubs/{name}")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let recreated: Value = r.json().await.unwrap();
    let key = recreated["properties"]["authorizationPolicies"][0]["primaryKey"].as_str().unwrap();
    let token = sas::sign(&host, key, common::unix_now() + 600, Some("iothubowner")).unwrap();
    let r = client.get(&url).header("Authorization", &token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "a deleted hub's identities must be gone");
}

#[tokio::test]
async fn identities_export_and_import_as_json_lines() {
    let hub = start();
    for id in ["e1", "e2"] {
        let r = hub.owner(Method::PUT, &format!("/devices/{id}")).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = hub.owner(Method::PUT, "/devices/e1/modules/m").json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let export = hub.operator(Method::GET, &format!("/operator/hubs/{}/identities", hub.name)).send().await.unwrap();
    assert_eq!(export.status(), StatusCode::OK);
    let text = export.text().await.unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines[0]["authentication"]["symmetricKey"]["primaryKey"].is_string());
    let keyless = hub
        .operator(Method::GET, &format!("/operator/hubs/{}/identities?keys=false", hub.name))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(keyless.lines().all(|l| {
        serde_json::from_str::<Value>(l).unwrap()["authentication"]["symmetricKey"]["primaryKey"].is_null()
    }));

    // Import into a fresh hub: the same identities, with the same keys.
    let other = unique_hub_name();
    let r = hub.operator(Method::PUT, &format!("/operator/hubs/{other}")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = hub.operator(Method::POST, &format!("/operator/hubs/{other}/identities")).body(text).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["importedCount"], 3);
    let again = hub
        .operator(Method::GET, &format!("/operator/hubs/{other}/identities"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let keys = |t: &str| -> Vec<Value> {
        t.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["authentication"].clone()).collect()
    };
    assert_eq!(keys(&again), lines.iter().map(|l| l["authentication"].clone()).collect::<Vec<_>>());
}

#[test]
fn hub_cli_creates_lists_shows_and_deletes() {
    let hub = start();
    let url = format!("https://localhost:{}", hub.server.info.https.port());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_iothubd"))
            .arg("hub")
            .args(args)
            .args(["--url", &url, "--data-dir"])
            .arg(hub.dir.path())
            .env("IOTHUBD_OPERATOR_KEY", "operator-secret")
            .output()
            .expect("cli runs");
        assert!(out.status.success(), "iothubd hub {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let name = unique_hub_name();
    let created = run(&["create", &name, "--partitions", "2"]);
    assert!(
        created.contains(&format!("HostName={name}.azure-devices.net;SharedAccessKeyName=iothubowner;")),
        "{created}"
    );
    assert!(run(&["list"]).contains(&name));
    assert!(run(&["show", &name]).contains("\"partitionCount\": 2"));
    assert!(run(&["connection-string", &name, "--policy", "service"]).contains("SharedAccessKeyName=service;"));
    run(&["delete", &name]);
    assert!(!run(&["list"]).contains(&name));
}

#[test]
fn a_second_hub_on_the_same_data_dir_is_refused() {
    let hub = start();
    let cfg = common::test_config(hub.dir.path(), &hub.name, &hub.owner_key, &hub.registry_read_key, false);
    let err = iothubd::server::start(cfg).err().expect("the data directory is taken");
    assert!(err.to_string().contains("another iothubd is using data_dir"), "{err}");
}
