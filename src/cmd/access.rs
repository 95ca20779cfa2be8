//! `gangway access ...` (who may do what; admin) and `gangway whoami`.

use super::common::ClientOpts;
use super::output::{new_table, print_action, table_string, Render};
use crate::client::ClientError;
use clap::{Args, Subcommand};
use gangway_proto::pb;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct AccessGroup {
    #[command(subcommand)]
    pub command: AccessCommand,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(Subcommand, Debug)]
pub enum AccessCommand {
    /// The rules: certificate names and tokens with their roles.
    List,
    /// Give a certificate name (client/alice, worker/h1) roles, replacing what it had.
    Grant {
        /// A certificate identity, e.g. client/alice.
        principal: String,
        /// viewer, submitter, operator, admin; comma-separated.
        #[arg(value_delimiter = ',', required = true)]
        roles: Vec<String>,
        /// Queues a submitter may submit to (default: all). Comma-separated.
        #[arg(long, value_delimiter = ',')]
        queues: Vec<String>,
    },
    /// Remove a certificate name's rule (it keeps no role).
    Revoke { principal: String },
    /// Create a bearer token with roles; it is printed once and stored only as its SHA-256.
    Token {
        /// The token's name (its callers appear as token/NAME).
        name: String,
        #[arg(value_delimiter = ',', required = true)]
        roles: Vec<String>,
        #[arg(long, value_delimiter = ',')]
        queues: Vec<String>,
    },
    /// Revoke a bearer token.
    RevokeToken { name: String },
}

#[derive(Args, Debug)]
pub struct WhoAmIArgs {
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(Debug, Serialize)]
struct Rule {
    principal: String,
    roles: Vec<String>,
    queues: Vec<String>,
}

fn rules_table(rules: &Vec<Rule>) -> String {
    let mut t = new_table(["PRINCIPAL", "ROLES", "QUEUES"]);
    for r in rules {
        let queues = if r.queues.is_empty() {
            "all".to_owned()
        } else {
            r.queues.join(",")
        };
        t.add_row(vec![r.principal.clone(), r.roles.join(","), queues]);
    }
    table_string(t)
}

#[derive(Debug, Serialize)]
struct WhoAmI {
    name: String,
    roles: Vec<String>,
    queues: Vec<String>,
    insecure: bool,
}

fn whoami_text(w: &WhoAmI) -> String {
    let roles = if w.roles.is_empty() {
        "none".to_owned()
    } else {
        w.roles.join(",")
    };
    let mut s = format!("{} (roles: {roles})", w.name);
    if !w.queues.is_empty() {
        s.push_str(&format!(" queues: {}", w.queues.join(",")));
    }
    if w.insecure {
        s.push_str("\nWARNING: the replica runs INSECURE (plain TCP, everyone is admin)");
    }
    s
}

fn grant(roles: Vec<String>, queues: Vec<String>) -> Option<pb::AccessGrant> {
    Some(pb::AccessGrant { roles, queues })
}

/// 32 random bytes as hex: the token people paste.
fn new_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub async fn access(g: AccessGroup) -> Result<(), ClientError> {
    let mut client = g.opts.client();
    let out = g.opts.output;
    let set = |principal: String, grant, token_sha256: String| pb::SetAccessRequest {
        principal,
        grant,
        token_sha256,
    };
    match g.command {
        AccessCommand::List => {
            let rules = client.list_access().await?;
            let rules = rules
                .rules
                .into_iter()
                .map(|r| {
                    let g = r.grant.unwrap_or_default();
                    Rule {
                        principal: r.principal,
                        roles: g.roles,
                        queues: g.queues,
                    }
                })
                .collect();
            let rules: Vec<Rule> = rules;
            println!("{}", Render::new(out, false).view(&rules, rules_table));
        }
        AccessCommand::Grant {
            principal,
            roles,
            queues,
        } => {
            client
                .set_access(set(principal.clone(), grant(roles, queues), String::new()))
                .await?;
            print_action(out, "grant", &principal, &format!("granted {principal}"));
        }
        AccessCommand::Revoke { principal } => {
            client
                .set_access(set(principal.clone(), None, String::new()))
                .await?;
            print_action(out, "revoke", &principal, &format!("revoked {principal}"));
        }
        AccessCommand::Token {
            name,
            roles,
            queues,
        } => {
            let token = new_token();
            let digest = gangway_proto::sha256::hex_digest(token.as_bytes());
            client
                .set_access(set(format!("token/{name}"), grant(roles, queues), digest))
                .await?;
            eprintln!("token/{name} created; it is shown once, keep it secret (GANGWAY_TOKEN):");
            println!("{token}");
        }
        AccessCommand::RevokeToken { name } => {
            client
                .set_access(set(format!("token/{name}"), None, String::new()))
                .await?;
            let target = format!("token/{name}");
            print_action(out, "revoke", &target, &format!("revoked {target}"));
        }
    }
    Ok(())
}

pub async fn whoami(a: WhoAmIArgs) -> Result<(), ClientError> {
    let mut client = a.opts.client();
    let r = client.who_am_i().await?;
    let view = WhoAmI {
        name: r.name,
        roles: r.roles,
        queues: r.queues,
        insecure: r.insecure,
    };
    println!(
        "{}",
        Render::new(a.opts.output, false).view(&view, whoami_text)
    );
    Ok(())
}
