//! Unary inspection RPCs: the compiled topology, one node's view, and the
//! agent table. Served on the mTLS listener and on the loopback plaintext
//! listener, for grpcurl.
//!
//! On the mTLS listener the caller's certificate decides: an operator
//! (`raven:operator:<name>`, issued by `raven-hub certs --operator`) sees
//! everything; a node (`system:node:<name>`) only its own view — a node
//! certificate is what a compromised edge box holds, and the topology and the
//! agent table (every agent's address) are not its business. The loopback
//! plaintext listener serves everything (whoever reaches it is on the hub's
//! host).

use raven_core::{NodeName, view};
use raven_proto::v1::{self, inspect_service_server::InspectService};
use tonic::{Request, Response, Status};

use crate::agents::Agents;
use crate::pipeline::PublishedRx;

#[derive(Debug, Clone)]
pub struct Inspect {
    pub published: PublishedRx,
    pub agents: Agents,
    /// Callers must present a node or operator certificate (the mTLS
    /// listener); `false` on the loopback plaintext listener.
    pub authorize: bool,
}

/// Who may see what.
enum Caller {
    /// An operator, or anyone on the loopback listener.
    Everything,
    /// A node: its own view only.
    Node(NodeName),
}

impl Inspect {
    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        if !self.authorize {
            return Ok(Caller::Everything);
        }
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated("inspection over mTLS needs a client certificate")
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate was presented"))?;
        match crate::certs::client_identity(leaf.as_ref()) {
            Ok(crate::certs::ClientIdentity::Operator(_)) => Ok(Caller::Everything),
            Ok(crate::certs::ClientIdentity::Node(n)) => Ok(Caller::Node(n)),
            Err(e) => Err(Status::permission_denied(e.to_string())),
        }
    }

    /// Only operators (and the loopback listener).
    fn operator_only<T>(&self, req: &Request<T>, what: &str) -> Result<(), Status> {
        match self.caller(req)? {
            Caller::Everything => Ok(()),
            Caller::Node(n) => Err(Status::permission_denied(format!(
                "node {n} may not call {what}: it needs an operator certificate (raven-hub certs --operator NAME); a node may read only its own view (GetNodeView)"
            ))),
        }
    }
}

#[tonic::async_trait]
impl InspectService for Inspect {
    async fn get_topology(
        &self,
        req: Request<v1::GetTopologyRequest>,
    ) -> Result<Response<v1::GetTopologyResponse>, Status> {
        self.operator_only(&req, "GetTopology")?;
        let p = self.published.borrow().clone();
        let mut resp = raven_proto::topology_to_proto(&p.epoch, p.revision, &p.topology);
        resp.json = p.topology.to_json();
        Ok(Response::new(resp))
    }

    async fn get_node_view(
        &self,
        req: Request<v1::GetNodeViewRequest>,
    ) -> Result<Response<v1::GetNodeViewResponse>, Status> {
        let caller = self.caller(&req)?;
        let raw = req.into_inner().node_name;
        let node = NodeName::new(raw.clone())
            .map_err(|e| Status::invalid_argument(format!("node_name {raw:?}: {e}")))?;
        if let Caller::Node(me) = &caller
            && *me != node
        {
            return Err(Status::permission_denied(format!(
                "node {me} may read only its own view, not {node}'s"
            )));
        }
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
        req: Request<v1::ListAgentsRequest>,
    ) -> Result<Response<v1::ListAgentsResponse>, Status> {
        self.operator_only(&req, "ListAgents")?;
        Ok(Response::new(v1::ListAgentsResponse {
            agents: self.agents.to_proto(),
        }))
    }
}
