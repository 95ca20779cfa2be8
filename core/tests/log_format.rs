//! The Raft log holds commands in bincode, which writes an enum variant as its position: a
//! variant inserted anywhere but at the end would make every entry already written decode as its
//! neighbour after an upgrade. These tags are the log format; they never change.

use gangway_core::state::Command;
use gangway_proto::ids::{HostName, JobId};

fn tag(command: &Command) -> u32 {
    let bytes = bincode::serialize(command).expect("encodes");
    u32::from_le_bytes(bytes[..4].try_into().unwrap())
}

#[test]
fn a_commands_tag_is_its_place_for_good() {
    let node = || HostName::new("h1");
    let job = || JobId::new("j-1");
    let table = [
        (
            Command::NodeDown {
                node: node(),
                reason: String::new(),
            },
            2,
        ),
        (
            Command::CancelJob {
                job: job(),
                reason: String::new(),
            },
            4,
        ),
        (
            Command::RequestCheckpoint {
                job: job(),
                reason: String::new(),
            },
            9,
        ),
        (Command::DrainDeadline { node: node() }, 19),
        (
            Command::RemoveNode {
                node: node(),
                reason: String::new(),
            },
            20,
        ),
        (Command::SubmitJobs(Vec::new()), 25),
        (Command::TaskStatuses(Vec::new()), 26),
    ];
    for (command, expected) in table {
        assert_eq!(tag(&command), expected, "{}", command.kind());
    }
}
