//! Running the commands: each one becomes a [`Request`] to the node (see
//! `client`), and its reply is printed as JSON or rendered for people.
//! `init`, `daemon`, `watch`, `demo` and `completions` have their own
//! paths.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use clap::CommandFactory;
use weft_node::api::{ApiError, Event, IdView, LinkCodeView, Request, Response};
use weft_node::home::Home;

use crate::cli::{
    Cli, Command, ContactCommand, DevicesCommand, GroupCommand, InitArgs, PrivacyArgs, PushCommand,
    RelayCommand, SendArgs, TypingArgs,
};
use crate::error::usage;
use crate::{client, daemon, demo, output};

/// How a reply is shown to people.
type Render = Box<dyn FnOnce(Response) -> String>;

/// Renders the view an answer should carry with `render`; an answer of
/// another shape (a daemon of another version) is shown as JSON.
fn show<T>(render: impl FnOnce(T) -> String + 'static) -> Render
where
    T: TryFrom<Response, Error = ApiError>,
{
    Box::new(move |response: Response| {
        let json = response.to_json();
        match T::try_from(response) {
            Ok(view) => render(view),
            Err(_) => output::pretty(&json),
        }
    })
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.global.json;
    match cli.command {
        Command::Completions { shell } => {
            let mut command = Cli::command();
            let mut buffer = Vec::new();
            clap_complete::generate(shell, &mut command, "weft", &mut buffer);
            output::out(&String::from_utf8_lossy(&buffer))
        }
        Command::Demo => demo::run(json).await,
        Command::Init(args) => init(&home(cli.global.home)?, args, json).await,
        Command::Devices(DevicesCommand::Link) => devices_link(&home(cli.global.home)?, json).await,
        Command::Id => id(&home(cli.global.home)?, json).await,
        Command::Daemon(args) => daemon::run(&home(cli.global.home)?, args, json).await,
        Command::Watch => watch(&home(cli.global.home)?, json).await,
        other => {
            let home = home(cli.global.home)?;
            let (request, render) = request_for(other)?;
            let reply = client::call(&home, request).await?;
            if json {
                output::out_json(&reply)
            } else {
                output::out(&render(reply))
            }
        }
    }
}

/// The home directory: `--home`/`WEFT_HOME`, or the platform data dir.
fn home(flag: Option<PathBuf>) -> anyhow::Result<Home> {
    let dir = match flag {
        Some(dir) => dir,
        None => directories::ProjectDirs::from("org", "weft", "weft")
            .map(|dirs| dirs.data_dir().to_path_buf())
            .ok_or_else(|| {
                anyhow!("cannot find a data directory for this user: pass --home DIR")
            })?,
    };
    Ok(Home::new(dir))
}

/// The request of a plain command and how to show its reply.
fn request_for(command: Command) -> anyhow::Result<(Request, Render)> {
    Ok(match command {
        Command::Status => (Request::Status, show(output::status)),
        Command::Contact(ContactCommand::Add { invite, name }) => (
            Request::ContactAdd {
                invite: invite.trim().to_string(),
                name,
            },
            show(output::contact_added),
        ),
        Command::Contact(ContactCommand::List) => (Request::ContactList, show(output::contacts)),
        Command::Contact(ContactCommand::Remove { alias }) => (
            Request::ContactRemove {
                alias: alias.clone(),
            },
            done(format!("Removed contact {alias}.")),
        ),
        Command::Contact(ContactCommand::Block { alias }) => (
            Request::ContactBlock {
                alias: alias.clone(),
            },
            done(format!(
                "Blocked {alias}: their messages are dropped from now on."
            )),
        ),
        Command::Contact(ContactCommand::Unblock { alias }) => (
            Request::ContactUnblock {
                alias: alias.clone(),
            },
            done(format!("Unblocked {alias}.")),
        ),
        Command::Send(SendArgs {
            target,
            text,
            reply_to,
        }) => {
            let text = if text == "-" { read_stdin()? } else { text };
            (
                Request::Send {
                    target: target.clone(),
                    text,
                    reply_to,
                },
                show(move |reply| output::sent(reply, &target)),
            )
        }
        Command::Group(GroupCommand::Create { name, members }) => (
            Request::GroupCreate { name, members },
            show(output::group_created),
        ),
        Command::Group(GroupCommand::Add { group, alias }) => (
            Request::GroupAdd {
                group: group.clone(),
                member: alias.clone(),
            },
            done(format!("Added {alias} to {group}.")),
        ),
        Command::Group(GroupCommand::Remove { group, alias }) => (
            Request::GroupRemove {
                group: group.clone(),
                member: alias.clone(),
            },
            done(format!("Removed {alias} from {group}.")),
        ),
        Command::Group(GroupCommand::Admin { group, alias }) => (
            Request::GroupAdmin {
                group: group.clone(),
                member: alias.clone(),
            },
            done(format!("{alias} is now an admin of {group}.")),
        ),
        Command::Group(GroupCommand::Leave { group }) => (
            Request::GroupLeave {
                group: group.clone(),
            },
            done(format!("You left {group}.")),
        ),
        Command::Group(GroupCommand::List) => (Request::GroupList, show(output::groups)),
        Command::Group(GroupCommand::Members { group }) => {
            (Request::GroupMembers { group }, show(output::members))
        }
        Command::Conversations => (Request::Conversations, show(output::conversations)),
        Command::Messages(args) => {
            let ids = args.ids;
            (
                Request::Messages {
                    target: args.target,
                    limit: args.limit,
                    before: args.before,
                },
                show(move |reply| output::messages(reply, ids)),
            )
        }
        Command::Edit { id, text } => (
            Request::Edit {
                id: id.clone(),
                text: text.clone(),
            },
            show(|reply| output::changed(reply, "Edited")),
        ),
        Command::Delete { id } => (
            Request::Delete { id: id.clone() },
            show(|reply| output::changed(reply, "Deleted")),
        ),
        Command::React { id, emoji, remove } => (
            Request::React {
                id: id.clone(),
                emoji: emoji.clone(),
                remove,
            },
            show(|reply| output::changed(reply, "Reactions updated")),
        ),
        Command::Read { target } => (
            Request::Read {
                target: target.clone(),
            },
            show(move |reply| output::marked_read(reply, &target)),
        ),
        Command::Presence { target } => (
            Request::Presence {
                target: target.clone(),
            },
            show(move |reply| output::presence(reply, &target)),
        ),
        Command::Typing(TypingArgs { target, stop }) => (
            Request::Typing {
                target: target.clone(),
                typing: !stop,
            },
            show(move |reply| output::typing(reply, &target)),
        ),
        Command::Privacy(PrivacyArgs { presence }) => {
            let changed = presence.is_some();
            (
                Request::Privacy { presence },
                show(move |reply| output::privacy(reply, changed)),
            )
        }
        Command::Relay(RelayCommand::List) => (Request::RelayList, show(output::relays)),
        Command::Devices(DevicesCommand::List) => (Request::DevicesList, show(output::devices)),
        Command::Devices(DevicesCommand::Revoke { device_id }) => (
            Request::DevicesRevoke { device: device_id },
            show(output::revoked),
        ),
        Command::Push(PushCommand::Register { url }) => (
            Request::PushRegister { url },
            done("Push wakeups registered with your relays.".into()),
        ),
        Command::Push(PushCommand::Unregister) => (
            Request::PushUnregister,
            done("Push wakeups turned off.".into()),
        ),
        Command::Init(_)
        | Command::Devices(DevicesCommand::Link)
        | Command::Id
        | Command::Daemon(_)
        | Command::Watch
        | Command::Demo
        | Command::Completions { .. } => bail!("internal: not a plain request"),
    })
}

/// A fixed confirmation, whatever the reply holds.
fn done(message: String) -> Render {
    Box::new(move |_| message)
}

/// The message text from standard input, without its final newline.
fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading the message from standard input")?;
    let trimmed = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if trimmed.is_empty() {
        return Err(usage("the message read from standard input is empty"));
    }
    Ok(trimmed.to_string())
}

/// `weft init`.
async fn init(home: &Home, args: InitArgs, json: bool) -> anyhow::Result<()> {
    if let Some(code) = &args.link {
        let mut net = weft_node::NetConfig::new(Vec::new());
        net.relay_target = 0;
        net.dht_server = false;
        let since = args.history_days.map_or(0, |days| {
            weft_node::now_ms() - i64::from(days) * 24 * 3600 * 1000
        });
        let view = weft_node::link_device(home, code, args.name.as_deref(), since, net)
            .await
            .map_err(client::node_error)?;
        if json {
            return output::out_json(&view);
        }
        return output::out(&format!(
            "Linked this device to the account of {} in {}.\n\n{}\nNext: run `weft daemon`: \
             the account's history comes from its other devices.",
            view.name,
            home.dir().display(),
            output::id(view.clone())
        ));
    }
    let name = args.name.ok_or_else(|| usage("--name NAME is required"))?;
    let view = home.init(&name).map_err(client::node_error)?;
    if json {
        return output::out_json(&view);
    }
    output::out(&format!(
        "Created the identity of {} in {}.\n\n{}\nNext: run `weft daemon` to go online, and give \
         your invite (`weft id`) to the people you want to talk to.",
        view.name,
        home.dir().display(),
        output::id(view.clone())
    ))
}

/// `weft devices link`: prints a one-time code, then waits until the new
/// device has joined.
async fn devices_link(home: &Home, json: bool) -> anyhow::Result<()> {
    client::require_initialized(home)?;
    let Some(mut watcher) = client::connect_daemon(home).await else {
        bail!(
            "no daemon is running for {}: start it with `weft daemon`; it answers the new device",
            home.dir().display()
        );
    };
    // Watch first, so that the join cannot be missed.
    watcher.watch().await.map_err(client::node_error)?;
    let reply: LinkCodeView = client::call(home, Request::DevicesLink).await?.try_into()?;
    let code = reply.code.clone();
    if json {
        output::out_json(&reply)?;
    } else {
        let mut text = format!(
            "On the new device, run:\n\n  weft init --link {code}\n\nThe code works once, for 10 minutes.\n"
        );
        if output::stdout_is_terminal()
            && let Some(qr) = output::qr(&code.to_ascii_uppercase())
        {
            text.push('\n');
            text.push_str(&qr);
        }
        output::out(&text)?;
    }
    let deadline = tokio::time::Instant::now()
        + std::time::Duration::from_millis(weft_node::link::CODE_LIFETIME_MS as u64);
    loop {
        let next = tokio::time::timeout_at(deadline, watcher.next_event()).await;
        match next {
            Err(_) => bail!("no device joined within 10 minutes; the code has expired"),
            Ok(Err(err)) => {
                return Err(client::node_error(err)).context("lost the connection to the daemon");
            }
            Ok(Ok(None)) => bail!("the daemon stopped before a device joined"),
            Ok(Ok(Some(Event::Device {
                event,
                device_id: device,
            }))) if event == "linked" => {
                return if json {
                    output::out_json(&serde_json::json!({"event": "linked", "device_id": device}))
                } else {
                    output::out(&format!("Device {device} joined the account."))
                };
            }
            Ok(Ok(Some(_))) => {}
        }
    }
}

/// `weft id`: the ids, the invite and, on a terminal, its QR code.
async fn id(home: &Home, json: bool) -> anyhow::Result<()> {
    let reply: IdView = client::call(home, Request::Id).await?.try_into()?;
    if json {
        return output::out_json(&reply);
    }
    let invite = reply.invite.clone();
    let mut text = output::id(reply);
    if output::stdout_is_terminal() {
        // Invites are case-insensitive; upper case fits the QR code's
        // alphanumeric mode, which makes a markedly smaller code.
        match output::qr(&invite.to_ascii_uppercase()) {
            Some(code) => {
                text.push('\n');
                text.push_str(&code);
            }
            None => text.push_str("\n(the invite is too long for a QR code)\n"),
        }
    }
    output::out(&text)
}

/// `weft watch`: streams the daemon's events until interrupted.
async fn watch(home: &Home, json: bool) -> anyhow::Result<()> {
    client::require_initialized(home)?;
    let Some(mut client) = client::connect_daemon(home).await else {
        bail!(
            "no daemon is running for {}: `weft watch` needs one (start it with `weft daemon`)",
            home.dir().display()
        );
    };
    let mut names = ConversationNames::default();
    client.watch().await.map_err(client::node_error)?;
    // On stderr, so that stdout holds only events; scripts (and the tests)
    // can wait for it to know no event is missed from here on.
    eprintln!("weft: watching events (Ctrl-C to stop)");
    let interrupted = tokio::signal::ctrl_c();
    let mut interrupted = std::pin::pin!(interrupted);
    loop {
        tokio::select! {
            next = client.next_event() => match next {
                Ok(Some(event)) => {
                    if json {
                        output::out_json(&event)?;
                    } else {
                        if let Some(id) = event.conversation() {
                            names.learn(home, id).await;
                        }
                        output::out(&output::event_line(&event, &|id| names.get(id)))?;
                    }
                }
                Err(err) => return Err(client::node_error(err))
                    .context("lost the connection to the daemon"),
                Ok(None) => {
                    eprintln!("weft: the daemon stopped");
                    return Ok(());
                }
            },
            _ = &mut interrupted => return Ok(()),
        }
    }
}

/// Conversation names for `watch`'s human output, fetched from the daemon
/// when an unknown conversation shows up.
#[derive(Debug, Default)]
struct ConversationNames {
    names: HashMap<String, String>,
}

impl ConversationNames {
    fn get(&self, id: &str) -> Option<String> {
        self.names.get(id).cloned()
    }

    async fn learn(&mut self, home: &Home, id: &str) {
        if self.names.contains_key(id) {
            return;
        }
        let Some(mut client) = client::connect_daemon(home).await else {
            return;
        };
        if let Ok(Response::Conversations(list)) = client.call(&Request::Conversations).await {
            self.names.extend(list.into_iter().map(|c| (c.id, c.name)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn request(args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let cli = Cli::try_parse_from(std::iter::once("weft").chain(args.iter().copied()))?;
        let (request, _) = request_for(cli.command)?;
        Ok(serde_json::to_value(request)?)
    }

    #[test]
    fn an_answer_of_another_shape_is_shown_as_json() {
        let render =
            show(|list: Vec<weft_node::api::ContactView>| format!("{} contacts", list.len()));
        assert_eq!(render(Response::Contacts(Vec::new())), "0 contacts");
        let render =
            show(|list: Vec<weft_node::api::ContactView>| format!("{} contacts", list.len()));
        let surprise = Response::Typing(weft_node::api::TypingView {
            conversation: "c1".into(),
            typing: true,
            told: 2,
        });
        let text = render(surprise);
        assert!(text.contains("\"told\": 2"), "{text}");
    }

    #[test]
    fn commands_become_requests() -> anyhow::Result<()> {
        assert_eq!(
            request(&["contact", "add", " weft1abc\n", "--name", "bob"])?,
            serde_json::json!({"cmd": "contact_add", "invite": "weft1abc", "name": "bob"})
        );
        assert_eq!(
            request(&["send", "bob", "hi", "--reply-to", "ab12"])?,
            serde_json::json!({"cmd": "send", "target": "bob", "text": "hi", "reply_to": "ab12"})
        );
        assert_eq!(
            request(&["group", "create", "g", "--member", "a", "--member", "b"])?,
            serde_json::json!({"cmd": "group_create", "name": "g", "members": ["a", "b"]})
        );
        assert_eq!(
            request(&["group", "admin", "g", "a"])?,
            serde_json::json!({"cmd": "group_admin", "group": "g", "member": "a"})
        );
        assert_eq!(
            request(&["messages", "g", "--limit", "3", "--before", "ff"])?,
            serde_json::json!({"cmd": "messages", "target": "g", "limit": 3, "before": "ff"})
        );
        assert_eq!(
            request(&["read", "bob"])?,
            serde_json::json!({"cmd": "read", "target": "bob"})
        );
        assert_eq!(
            request(&["presence", "bob"])?,
            serde_json::json!({"cmd": "presence", "target": "bob"})
        );
        assert_eq!(
            request(&["typing", "g"])?,
            serde_json::json!({"cmd": "typing", "target": "g", "typing": true})
        );
        assert_eq!(
            request(&["typing", "g", "--stop"])?,
            serde_json::json!({"cmd": "typing", "target": "g", "typing": false})
        );
        assert_eq!(
            request(&["privacy"])?,
            serde_json::json!({"cmd": "privacy", "presence": null})
        );
        assert_eq!(
            request(&["privacy", "--presence", "nobody"])?,
            serde_json::json!({"cmd": "privacy", "presence": "nobody"})
        );
        assert_eq!(request(&["status"])?["cmd"], "status");
        assert!(request(&["watch"]).is_err());
        Ok(())
    }
}
