// java Fetch.java URL: GET URL with the JDK's HttpClient (HTTP/2 when the server agrees) and
// print "STATUS VERSION BODY". Its trust comes from the JVM's defaults, as an app's would.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Fetch {
    public static void main(String[] args) throws Exception {
        HttpClient client = HttpClient.newHttpClient();
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[0])).build();
        HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
        System.out.print(response.statusCode() + " " + response.version() + " " + response.body());
    }
}
