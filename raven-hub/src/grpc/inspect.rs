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
        Ok(Response::new(topology_page(
            &p.epoch,
            p.revision,
            &p.topology,
            &req.into_inner(),
        )?))
    }

    async fn get_node_view(
        &self,
        req: Request<v1::GetNodeViewRequest>,
    ) -> Result<Response<v1::GetNodeViewResponse>, Status> {
        let caller = self.caller(&req)?;
        let req = req.into_inner();
        let (raw, compact) = (req.node_name, req.compact);
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
        let resources = view::node_view(&p.topology, &node, compact)
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

/// Kinds a `GetTopologyRequest.kinds` entry may name.
const KINDS: [&str; 5] = ["settings", "gateway", "prefixes", "node", "peer"];

fn kind_of(name: &str) -> &str {
    name.split_once('/').map_or(name, |(k, _)| k)
}

/// `revision epoch name`: where the next page starts (after `name`), valid
/// for that (epoch, revision) only.
fn page_token(epoch: &str, revision: u64, last: &str) -> String {
    format!("{revision} {epoch} {last}")
}

/// One page of the topology for `req`: the resources after the token that
/// the filters select, at most `page_size` of them. Work is proportional to
/// the page (a range of the sorted map), not to the topology, except for
/// `total_resources` on a filtered request.
pub fn topology_page(
    epoch: &str,
    revision: u64,
    topology: &raven_core::Topology,
    req: &v1::GetTopologyRequest,
) -> Result<v1::GetTopologyResponse, Status> {
    if let Some(bad) = req.kinds.iter().find(|k| !KINDS.contains(&k.as_str())) {
        return Err(Status::invalid_argument(format!(
            "kinds: {bad:?} is not one of {}",
            KINDS.join(", ")
        )));
    }
    let after = if req.page_token.is_empty() {
        None
    } else {
        let stale = || {
            Status::failed_precondition(format!(
                "page_token {:?} is not of the current topology (epoch {epoch}, revision {revision}): it changed between pages; start again without a token",
                req.page_token
            ))
        };
        let (head, name) = req.page_token.rsplit_once(' ').ok_or_else(stale)?;
        let (rev, ep) = head.split_once(' ').ok_or_else(stale)?;
        if rev != revision.to_string() || ep != epoch {
            return Err(stale());
        }
        Some(name.to_owned())
    };
    let selected = |name: &str| {
        name.starts_with(&req.name_prefix)
            && (req.kinds.is_empty() || req.kinds.iter().any(|k| k == kind_of(name)))
    };
    let limit = if req.page_size == 0 {
        usize::MAX
    } else {
        req.page_size as usize
    };
    let range = topology.resources.iter().filter(|(n, _)| match &after {
        Some(a) => n.as_str() > a.as_str(),
        None => true,
    });
    let mut resources = Vec::new();
    let mut next_page_token = String::new();
    for (name, r) in range.filter(|(n, _)| selected(n.as_str())) {
        if resources.len() == limit {
            if let Some(last) = resources.last().map(|r: &v1::Resource| r.name.clone()) {
                next_page_token = page_token(epoch, revision, &last);
            }
            break;
        }
        resources.push(raven_proto::resource_to_proto(name, r));
    }
    let total = if req.kinds.is_empty() && req.name_prefix.is_empty() {
        topology.resources.len()
    } else {
        topology
            .resources
            .keys()
            .filter(|n| selected(n.as_str()))
            .count()
    };
    #[allow(deprecated)]
    Ok(v1::GetTopologyResponse {
        epoch: epoch.to_owned(),
        revision,
        resources,
        problems: if after.is_none() {
            topology
                .problems
                .iter()
                .map(raven_proto::problem_to_proto)
                .collect()
        } else {
            Vec::new()
        },
        json: if req.include_json {
            topology.to_json()
        } else {
            String::new()
        },
        next_page_token,
        total_resources: u32::try_from(total).unwrap_or(u32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_manual() -> raven_core::Topology {
        let loaded = raven_core::manifest::load(&crate::embedded::user_manual());
        raven_core::compile(&loaded.inputs).topology
    }

    fn names(r: &v1::GetTopologyResponse) -> Vec<&str> {
        r.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn pages_cover_every_resource_once_in_order_and_problems_come_on_the_first() {
        let t = user_manual();
        let mut req = v1::GetTopologyRequest {
            page_size: 4,
            ..Default::default()
        };
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let page = topology_page("e", 3, &t, &req).expect("page");
            assert!(page.resources.len() <= 4);
            assert_eq!(page.total_resources as usize, t.resources.len());
            if pages > 0 {
                assert!(page.problems.is_empty());
            }
            seen.extend(names(&page).into_iter().map(str::to_owned));
            pages += 1;
            if page.next_page_token.is_empty() {
                break;
            }
            req.page_token = page.next_page_token;
        }
        let all: Vec<String> = t.resources.keys().map(|n| n.as_str().to_owned()).collect();
        assert_eq!(seen, all);
        assert_eq!(pages, all.len().div_ceil(4));
    }

    #[test]
    fn kinds_and_a_name_prefix_select_resources_and_json_only_on_request() {
        let t = user_manual();
        let gw = topology_page(
            "e",
            3,
            &t,
            &v1::GetTopologyRequest {
                kinds: vec!["gateway".into()],
                ..Default::default()
            },
        )
        .expect("gateways");
        assert_eq!(
            names(&gw),
            vec![
                "gateway/gw-cloud",
                "gateway/gw-hangzhou",
                "gateway/gw-qingdao"
            ]
        );
        #[allow(deprecated)]
        let json = gw.json;
        assert_eq!(json, "");
        let one = topology_page(
            "e",
            3,
            &t,
            &v1::GetTopologyRequest {
                name_prefix: "gateway/gw-hang".into(),
                include_json: true,
                ..Default::default()
            },
        )
        .expect("one");
        assert_eq!(names(&one), vec!["gateway/gw-hangzhou"]);
        assert_eq!(one.total_resources, 1);
        #[allow(deprecated)]
        let json = one.json;
        assert_eq!(json, t.to_json());
    }

    #[test]
    fn an_unknown_kind_and_a_token_of_another_revision_are_refused() {
        let t = user_manual();
        let bad = topology_page(
            "e",
            3,
            &t,
            &v1::GetTopologyRequest {
                kinds: vec!["gateways".into()],
                ..Default::default()
            },
        )
        .expect_err("unknown kind");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().contains("\"gateways\""), "{}", bad.message());
        let first = topology_page(
            "e",
            3,
            &t,
            &v1::GetTopologyRequest {
                page_size: 2,
                ..Default::default()
            },
        )
        .expect("first page");
        let stale = topology_page(
            "e",
            4,
            &t,
            &v1::GetTopologyRequest {
                page_size: 2,
                page_token: first.next_page_token,
                ..Default::default()
            },
        )
        .expect_err("stale token");
        assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    }
}
