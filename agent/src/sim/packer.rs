//! A simulated packaging machine that speaks MQTT itself: every second it publishes its state as
//! JSON on `{prefix}/{machine}/state` (QoS 1), and its identity once, retained, on
//! `{prefix}/{machine}/info`.
//!
//! State: `{"ts": <epoch ms>, "state": "RUNNING" | "STOPPED", "speed_ppm": ~120, "packs": <count>,
//! "rejects": <count>, "film_temp_c": ~165}`. It stops for 5 s in every 60 (a film change), and
//! rejects about 1 pack in 50.

use std::time::Duration;

/// Publishes until the process ends (or the task is dropped).
pub async fn run(host: String, port: u16, prefix: String, machine: String) {
    let mut opts = rumqttc::MqttOptions::new(format!("sim-{machine}"), host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 16);
    tokio::spawn(async move {
        loop {
            if events.poll().await.is_err() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    let info = serde_json::json!({"vendor": "demo", "model": "FlowWrap 300", "serial": machine});
    let _ = client
        .publish(
            format!("{prefix}/{machine}/info"),
            rumqttc::QoS::AtLeastOnce,
            true,
            info.to_string(),
        )
        .await;
    let (mut packs, mut rejects, mut tick) = (0u64, 0u64, 0u64);
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        tick += 1;
        let running = tick % 60 >= 5;
        let speed = if running { 118.0 + fastrand::f64() * 4.0 } else { 0.0 };
        if running {
            let made = 2;
            packs += made;
            if fastrand::u32(0..25) == 0 {
                rejects += 1;
            }
        }
        let state = serde_json::json!({
            "ts": crate::model::now_millis(),
            "state": if running { "RUNNING" } else { "STOPPED" },
            "speed_ppm": (speed * 10.0_f64).round() / 10.0,
            "packs": packs,
            "rejects": rejects,
            "film_temp_c": ((163.0 + fastrand::f64() * 4.0) * 10.0_f64).round() / 10.0,
        });
        let _ = client
            .publish(
                format!("{prefix}/{machine}/state"),
                rumqttc::QoS::AtLeastOnce,
                false,
                state.to_string(),
            )
            .await;
    }
}
