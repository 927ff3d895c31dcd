//! Recording Events (events.k8s.io) about SchemaMigrations, without remembering them.
//!
//! kube's `Recorder` keeps every Event it published for six minutes, to count a repeat
//! into a series, and forgets them only when it publishes the next one: after 10,000
//! resources turned Ready at once, those Events were half of the controller's heap, held
//! until something else happened. The controller records news only (a new phase, a run
//! that finished, a failure message that changed), so a repeat is rare and may well be an
//! Event of its own.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, Recorder, Reporter};

/// Publishes Events as this controller, keeping nothing once published.
#[derive(Clone)]
pub struct EventRecorder {
    client: Client,
    reporter: Reporter,
}

impl EventRecorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        EventRecorder { client, reporter }
    }

    /// Creates `event` about `reference` (the Event kube's `Recorder` creates, through a
    /// `Recorder` that lives for this one Event).
    pub async fn publish(
        &self,
        event: &Event,
        reference: &ObjectReference,
    ) -> Result<(), kube::Error> {
        Recorder::new(self.client.clone(), self.reporter.clone())
            .publish(event, reference)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use kube::runtime::events::EventType;

    #[tokio::test]
    async fn every_event_is_created_and_none_is_kept_for_a_series() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                seen.push((
                    request.method().to_string(),
                    request.uri().path().to_string(),
                ));
                let body = http_body_util::BodyExt::collect(request.into_body())
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                send.send_response(
                    Response::builder()
                        .status(201)
                        .body(Body::from(body.to_vec()))
                        .unwrap(),
                );
                if seen.len() == 2 {
                    break;
                }
            }
            seen
        });
        let recorder = EventRecorder::new(
            Client::new(service, "shop"),
            Reporter {
                controller: "schemagate-test".into(),
                instance: None,
            },
        );
        let event = Event {
            type_: EventType::Normal,
            reason: "UpToDate".into(),
            note: Some("Ready: the database is at 3".into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        let reference = ObjectReference {
            api_version: Some("schemagate.dev/v1alpha1".into()),
            kind: Some("SchemaMigration".into()),
            name: Some("orders".into()),
            namespace: Some("shop".into()),
            uid: Some("uid-orders".into()),
            ..Default::default()
        };
        recorder.publish(&event, &reference).await.unwrap();
        recorder.publish(&event, &reference).await.unwrap();
        let seen = api.await.unwrap();
        assert_eq!(
            seen,
            vec![
                (
                    "POST".to_string(),
                    "/apis/events.k8s.io/v1/namespaces/shop/events".to_string()
                );
                2
            ],
            "the same Event twice is created twice (kube's Recorder would patch a series, \
             which means keeping the first)"
        );
    }
}
