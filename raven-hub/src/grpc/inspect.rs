//! Unary inspection RPCs: the compiled topology, one node's view, and the
//! agent table. Served on the mTLS listener and on the loopback plaintext
//! listener, for grpcurl.

use raven_core::{NodeName, view};
use raven_proto::v1::{self, inspect_service_server::InspectService};
use tonic::{Request, Response, Status};

use crate::agents::Agents;
use crate::pipeline::PublishedRx;

#[derive(Debug, Clone)]
pub struct Inspect {
    pub published: PublishedRx,
    pub agents: Agents,
}

#[tonic::async_trait]
impl InspectService for Inspect {
    async fn get_topology(
        &self,
        _: Request<v1::GetTopologyRequest>,
    ) -> Result<Response<v1::GetTopologyResponse>, Status> {
        let p = self.published.borrow().clone();
        let mut resp = raven_proto::topology_to_proto(&p.epoch, p.revision, &p.topology);
        resp.json = p.topology.to_json();
        Ok(Response::new(resp))
    }

    async fn get_node_view(
        &self,
        req: Request<v1::GetNodeViewRequest>,
    ) -> Result<Response<v1::GetNodeViewResponse>, Status> {
        let raw = req.into_inner().node_name;
        let node = NodeName::new(raw.clone())
            .map_err(|e| Status::invalid_argument(format!("node_name {raw:?}: {e}")))?;
        let p = self.published.borrow().clone();
        if p.topology.node(&node).is_none() {
            return Err(Status::not_found(format!(
                "node {node} is not in the topology"
            )));
        }
        let resources = view::node_view(&p.topology, &node)
            .into_iter()
            .map(|(n, r)| raven_proto::resource_to_proto(&n, r))
            .collect();
        Ok(Response::new(v1::GetNodeViewResponse {
            epoch: p.epoch.clone(),
            revision: p.revision,
            resources,
        }))
    }

    async fn list_agents(
        &self,
        _: Request<v1::ListAgentsRequest>,
    ) -> Result<Response<v1::ListAgentsResponse>, Status> {
        Ok(Response::new(v1::ListAgentsResponse {
            agents: self.agents.to_proto(),
        }))
    }
}
